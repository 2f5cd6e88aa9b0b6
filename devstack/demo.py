"""`make demo`: the whole mission on this machine, on embedded defaults.

Starts PostgreSQL with pgvector (data under .data/), Redis, a worker and Flower; migrates; loads
the sample catalog; uses the Ollama at OLLAMA_URL when one answers, else the fake; runs the
backfill with a live progress bar; prints the summary, coverage and Flower's URL; then prints
the lines that point the README's operator commands at it, and serves until Ctrl-C, SIGTERM or
SIGHUP (or exits at once with --once), stopping every process it started.

Every process it starts is written down in .data/demo.json: a demo killed with SIGKILL leaves
its servers running, and the next one stops them first.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import sqlalchemy as sa
from rich.console import Console

from devstack.demo_ledger import Ledger, stop_group
from devstack.fake_ollama import FakeOllama
from devstack.ports import free_port, wait_for_port
from devstack.postgres import LocalPostgres, PostgresError
from devstack.redis import LocalRedis

CATALOG = Path(__file__).with_name("catalog.json")
WORKER_ROLE = "everyskill_worker"  # the worker's own login: no owner, no superuser, no BYPASSRLS
WORKER_PASSWORD = "demo"  # noqa: S105 (a loopback-only demo server)
DATABASE = "everyskill"
# The fake's second model, for the README's switch example: a real model of the same size as
# nomic-embed-text (768), so the switch needs no change to the column.
SECOND_MODEL = "embeddinggemma"
ENV_FILE = "demo.env"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
console = Console()


class Stopped(Exception):
    """A stop signal arrived; unwinding stops what was started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class DemoError(Exception):
    """A step failed; the message says which, and the tool's own words were shown above it."""


def say(message: str) -> None:
    console.print(f"[bold cyan]demo[/] {message}", highlight=False, soft_wrap=True)


def shown(args: list[str]) -> str:
    """The command line as an operator would type it: `python`, not this interpreter's path."""
    return shlex.join(["python" if arg == sys.executable else arg for arg in args])


def ollama_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def clean_up(ledger: Ledger, pg: LocalPostgres) -> None:
    """Stop what an earlier demo, killed before it could, left running; say so in one line."""
    demo, left = ledger.left_behind()
    if demo is not None and demo.pid != os.getpid():
        raise DemoError(
            f"another demo (pid {demo.pid}) serves from {ledger.path.parent}: stop it first"
            f" (kill {demo.pid}), or give this one another --data"
        )
    # Last started, first stopped: a worker stopped after Redis would wait for its broker.
    stopped = [name for name, process in reversed(left.items()) if stop_group(process)]
    if pg.running():
        pg.stop()
        stopped.append("PostgreSQL")
    ledger.end()
    if stopped:
        say(f"Stopped what an earlier demo left running when it was killed: {', '.join(stopped)}")


def prepare_database(pg: LocalPostgres) -> None:
    """The database and the worker's own login role."""
    if not pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'").strip():
        pg.psql(f"CREATE DATABASE {DATABASE}")
    if not pg.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{WORKER_ROLE}'").strip():
        pg.psql(
            f"CREATE ROLE {WORKER_ROLE} LOGIN PASSWORD '{WORKER_PASSWORD}' NOSUPERUSER NOBYPASSRLS"
        )


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
    # A session of its own: a terminal's Ctrl-C reaches the demo alone, which stops the
    # process and its children together (a worker's pool) through its process group.
    with log.open("ab") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_step(args: list[str], env: dict[str, str], ledger: Ledger, name: str) -> int:
    """Run a command in the foreground (its output is the demo's); stopped with the demo."""
    process = subprocess.Popen(args, env=env, start_new_session=True)
    ledger.add(name, process.pid)
    try:
        return process.wait()
    finally:
        stop_process(process)


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = path.read_text(errors="replace")[-2000:]
            raise DemoError(f"{path.name} did not become ready:\n{tail}")
        time.sleep(0.1)


def write_exports(data: Path, env: dict[str, str]) -> list[str]:
    """The lines that point an operator's shell at this demo; also kept in .data/demo.env."""
    names = ("DATABASE_URL", "REDIS_URL", "OLLAMA_URL", "HEALTH_DIR")
    lines = [f"export {name}={shlex.quote(env[name])}" for name in names]
    (data / ENV_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # Further signals wait for the cleanup this one starts.
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


def run(data: Path, once: bool, flower_port: int | None, metrics_port: int | None) -> int:
    data = data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    ledger = Ledger(data)
    pg = LocalPostgres(data / "postgres")
    clean_up(ledger, pg)
    # After the clean-up: a killed demo's Flower may still have held 5555.
    flower_port = flower_port or (5555 if _free(5555) else free_port())
    metrics_port = metrics_port or (9808 if _free(9808) else free_port())
    ledger.begin()
    try:
        with ExitStack() as stack:
            return serve(stack, data, logs, ledger, pg, once, flower_port, metrics_port)
    finally:
        ledger.end()


def serve(
    stack: ExitStack,
    data: Path,
    logs: Path,
    ledger: Ledger,
    pg: LocalPostgres,
    once: bool,
    flower_port: int,
    metrics_port: int,
) -> int:
    say(f"Starting PostgreSQL 18 + pgvector (data in {data / 'postgres'})")
    stack.callback(pg.stop)
    pg.start()
    prepare_database(pg)

    say("Starting Redis")
    redis = LocalRedis(data_dir=data / "redis")
    stack.callback(redis.stop)
    redis.start()
    if redis.process is not None:
        ledger.add("Redis", redis.process.pid)

    ollama_url = os.environ.get("OLLAMA_URL", "http://localhost:11434").rstrip("/")
    if ollama_answers(ollama_url):
        say(f"Using the Ollama at {ollama_url}")
    else:
        # Shaped like all-MiniLM-L6-v2 on a CPU: a fixed cost per request, one per text.
        fake = FakeOllama(
            models=("nomic-embed-text", SECOND_MODEL), request_latency=0.0075, input_latency=0.0043
        ).start()
        stack.callback(fake.stop)
        say(
            f"[yellow]No Ollama answers at {ollama_url}: using the built-in fake Ollama at"
            f" {fake.url} (models nomic-embed-text and {SECOND_MODEL}, 768 dimensions)."
            " Its vectors are deterministic but NOT semantic.[/]"
        )
        ollama_url = fake.url

    admin_url = pg.url(database=DATABASE)
    env = {
        **os.environ,
        "DATABASE_URL": pg.url(WORKER_ROLE, WORKER_PASSWORD, DATABASE),
        "REDIS_URL": redis.url,
        "OLLAMA_URL": ollama_url,
        "HEALTH_DIR": str(data / "health"),
        "PYTHONUNBUFFERED": "1",
    }
    migrate = [sys.executable, "-m", "worker", "migrate", "--grant", WORKER_ROLE]
    say(f"Migrating as the superuser, granting the worker's role: {shown(migrate)}")
    if run_step(migrate, {**env, "DATABASE_URL": admin_url}, ledger, "migrate") != 0:
        raise DemoError(f"{shown(migrate)} failed (its error is above)")
    skills, published = load_catalog(admin_url, ollama_url)
    say(f"Catalog: {skills} skills in 2 tenants, {published} published")

    worker_log = logs / "worker.log"
    worker_args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO"]
    say(f"Starting a worker: {shown(worker_args)} (log: {worker_log})")
    worker_log.write_text("")
    worker = start_process(worker_args, {**env, "METRICS_PORT": str(metrics_port)}, worker_log)
    stack.callback(stop_process, worker)
    ledger.add("the worker", worker.pid)

    password = secrets.token_urlsafe(9)
    flower_args = [sys.executable, "-m", "celery", "-A", "worker", "flower",
                   f"--port={flower_port}", "--address=127.0.0.1"]  # fmt: skip
    say(f"Starting Flower: {shown(flower_args)} (log: {logs / 'flower.log'})")
    flower = start_process(
        flower_args, {**env, "FLOWER_BASIC_AUTH": f"admin:{password}"}, logs / "flower.log"
    )
    stack.callback(stop_process, flower)
    ledger.add("Flower", flower.pid)
    # Both start at once (each spends seconds importing); the backfill needs the worker alone.
    wait_for_log(worker_log, "ready.", worker, 60)

    backfill = [sys.executable, "-m", "worker", "backfill", "--wait", "--timeout", "900"]
    say(f"Running the backfill: {shown(backfill)}")
    returncode = run_step(backfill, env, ledger, "the backfill")
    run_step([sys.executable, "-m", "worker", "status"], env, ledger, "status")
    wait_for_port("127.0.0.1", flower_port, 30)
    console.print(
        f"Flower: [bold]http://127.0.0.1:{flower_port}[/]  login [bold]admin[/] /"
        f" [bold]{password}[/]",
        highlight=False,
    )
    if once:
        return returncode
    exports = write_exports(data, env)
    console.print(f"Metrics: [bold]http://127.0.0.1:{metrics_port}/metrics[/]", highlight=False)
    say(
        f"Serving. These lines point the README's operator commands at it, as the worker's own"
        f" role {WORKER_ROLE} (also in {data / ENV_FILE}):"
    )
    # Plain print: a console would wrap a long URL, and the lines must paste as they are.
    print("\n".join(exports), flush=True)
    say("Stop it with Ctrl-C (or SIGTERM, SIGHUP): it stops everything it started.")
    try:
        while worker.poll() is None:
            time.sleep(1)
    except Stopped as stop:
        # Stopping is how a serving demo ends: the stack's close is its work, not a failure.
        stack.close()
        with suppress(OSError):  # SIGHUP: the terminal may be gone
            say(f"{stop}: stopped everything the demo started")
        return returncode
    raise DemoError(f"the worker exited with status {worker.returncode}: see {worker_log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the summary")
    parser.add_argument("--data", type=Path, default=Path(".data"), help="state directory")
    parser.add_argument("--flower-port", type=int, default=None, help="default: 5555 if free")
    parser.add_argument("--metrics-port", type=int, default=None, help="default: 9808 if free")
    args = parser.parse_args(argv)
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)
    try:
        return run(args.data, args.once, args.flower_port, args.metrics_port)
    except Stopped as stop:
        with suppress(OSError):  # SIGHUP: the terminal may be gone
            say(f"{stop}: stopped everything the demo started")
        return 128 + stop.signum
    except (DemoError, PostgresError) as exc:
        say(f"[red]error: {exc}[/]")
        return 1


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    raise SystemExit(main())
