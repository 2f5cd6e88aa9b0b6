"""`make demo`: the whole mission on this machine, on embedded defaults.

Starts PostgreSQL with pgvector (data under .data/), Redis, a worker and Flower; migrates; loads
the sample catalog; uses the Ollama at OLLAMA_URL when one answers, else the fake; runs the
backfill with a live progress bar; prints the summary, coverage and Flower's URL; serves until
Ctrl-C (or exits at once with --once) and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console

from devstack.fake_ollama import FakeOllama
from devstack.ports import free_port, wait_for_port
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis

CATALOG = Path(__file__).with_name("catalog.json")
APP_ROLE = "everyskill_app"
DATABASE = "everyskill"
console = Console()


def say(message: str) -> None:
    console.print(f"[bold cyan]demo[/] {message}", highlight=False)


def ollama_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def prepare_database(pg: LocalPostgres) -> None:
    """The database and the app's non-owner login role the worker connects as."""
    if not pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'").strip():
        pg.psql(f"CREATE DATABASE {DATABASE}")
    if not pg.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}'").strip():
        pg.psql(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD 'demo' NOSUPERUSER NOBYPASSRLS")


def load_catalog(admin_url: str, ollama_url: str) -> tuple[int, int]:
    """Tenants, their settings and skills; rows already there are left alone. (skills, published)"""
    catalog: dict[str, Any] = json.loads(CATALOG.read_text(encoding="utf-8"))
    engine = sa.create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as connection:
        for tenant in catalog["tenants"]:
            connection.execute(
                sa.text(
                    "INSERT INTO tenants (id, name, slug) VALUES (:id, :name, :id)"
                    " ON CONFLICT (id) DO NOTHING"
                ),
                tenant,
            )
            connection.execute(
                sa.text(
                    "INSERT INTO site_settings (id, tenant_id, semantic_similarity_enabled,"
                    " ollama_url) VALUES (:id, :id, :enabled, :url)"
                    " ON CONFLICT (tenant_id) DO UPDATE SET ollama_url = EXCLUDED.ollama_url"
                ),
                {"id": tenant["id"], "enabled": tenant["semantic_similarity_enabled"],
                 "url": ollama_url},
            )  # fmt: skip
        connection.execute(
            sa.text(
                "INSERT INTO skills (id, tenant_id, name, description, status, visibility)"
                " VALUES (:id, :tenant_id, :name, :description, :status, :visibility)"
                " ON CONFLICT (id) DO NOTHING"
            ),
            catalog["skills"],
        )
    engine.dispose()
    enabled = {t["id"] for t in catalog["tenants"] if t["semantic_similarity_enabled"]}
    published = sum(
        1 for s in catalog["skills"] if s["status"] == "published" and s["tenant_id"] in enabled
    )
    return len(catalog["skills"]), published


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{path.name} did not become ready:\n{tail}")
        time.sleep(0.1)


def run(data: Path, once: bool, flower_port: int) -> int:
    data.mkdir(parents=True, exist_ok=True)
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        say(f"Starting PostgreSQL 18 + pgvector (data in {data / 'postgres'})")
        pg = LocalPostgres(data / "postgres")
        pg.stop()  # a demo killed earlier may have left its server running
        pg.start()
        stack.callback(pg.stop)
        prepare_database(pg)

        say("Starting Redis")
        redis = LocalRedis(data_dir=data / "redis").start()
        stack.callback(redis.stop)

        ollama_url = os.environ.get("OLLAMA_URL", "http://localhost:11434").rstrip("/")
        if ollama_answers(ollama_url):
            say(f"Using the Ollama at {ollama_url}")
        else:
            # Shaped like all-MiniLM-L6-v2 on a CPU: a fixed cost per request, one per text.
            fake = FakeOllama(request_latency=0.0075, input_latency=0.0043).start()
            stack.callback(fake.stop)
            say(
                f"[yellow]No Ollama answers at {ollama_url}: using the built-in fake Ollama at"
                f" {fake.url}. Its vectors are deterministic but NOT semantic.[/]"
            )
            ollama_url = fake.url

        admin_url = pg.url(database=DATABASE)
        env = {
            **os.environ,
            "DATABASE_URL": pg.url(APP_ROLE, "demo", DATABASE),
            "REDIS_URL": redis.url,
            "OLLAMA_URL": ollama_url,
            "PYTHONUNBUFFERED": "1",
        }
        migrate_env = {**env, "DATABASE_URL": admin_url}
        subprocess.run([sys.executable, "-m", "worker", "migrate", "--grant", APP_ROLE],
                       env=migrate_env, check=True)  # fmt: skip
        skills, published = load_catalog(admin_url, ollama_url)
        say(f"Catalog: {skills} skills in 2 tenants, {published} published")

        say(f"Starting a worker (log: {logs / 'worker.log'})")
        worker_log = logs / "worker.log"
        worker_log.write_text("")
        worker = start_process(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO"],
            env,
            worker_log,
        )
        stack.callback(stop_process, worker)
        wait_for_log(worker_log, "ready.", worker, 60)

        password = secrets.token_urlsafe(9)
        flower_env = {**env, "FLOWER_BASIC_AUTH": f"admin:{password}"}
        flower = start_process(
            [sys.executable, "-m", "celery", "-A", "worker", "flower",
             f"--port={flower_port}", "--address=127.0.0.1"],
            flower_env, logs / "flower.log",
        )  # fmt: skip
        stack.callback(stop_process, flower)
        wait_for_port("127.0.0.1", flower_port, 30)

        say("Running the backfill: celery -A worker call tasks.backfill")
        result = subprocess.run(
            [sys.executable, "-m", "worker", "backfill", "--wait", "--timeout", "900"],
            env=env,
        )
        subprocess.run([sys.executable, "-m", "worker", "status"], env=env)
        console.print(
            f"Flower: [bold]http://127.0.0.1:{flower_port}[/]  login [bold]admin[/] /"
            f" [bold]{password}[/]",
            highlight=False,
        )
        if once:
            return result.returncode
        say("Serving; publish or edit skills and watch them in Flower. Ctrl-C stops everything.")
        try:
            while worker.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print()
        say("Stopping the worker, Flower, Redis and PostgreSQL")
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the summary")
    parser.add_argument("--data", type=Path, default=Path(".data"), help="state directory")
    parser.add_argument("--flower-port", type=int, default=None, help="default: 5555 if free")
    args = parser.parse_args(argv)
    port = args.flower_port or (5555 if _free(5555) else free_port())
    return run(args.data, args.once, port)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    raise SystemExit(main())
