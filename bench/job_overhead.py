"""Where a job's time goes: the per-job cost of `tasks.embed_skill` with no model work at all.

`python -m bench.job_overhead` records a run whose N items all have their outcome already (what
a job meets once its batch has gone through), queues one `tasks.embed_skill` per item while no
worker runs, then starts a real worker and times it draining the queue. It samples the CPU time
of the worker's main process, its pool process, Redis and PostgreSQL, and reports each per job.

It then measures PostgreSQL's write ceiling: our upsert of the same number of vectors, 32 a
statement, with nothing else running, with and without the app's HNSW index.

Variants (`--variants`) change one worker option at a time, so each choice's cost is measured:
`default`, `no-events` (TASK_EVENTS=false: Flower would see no jobs), `solo-pool` (the job runs
in the worker's main process), `prefetch-4` (four messages reserved at a time), `info-log`
(Celery's two log lines per job).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import redis as redis_lib
import sqlalchemy as sa
from celery import Celery
from rich.console import Console
from rich.table import Table

from bench.throughput import RESULTS, TENANT, psycopg_url, seed_catalog
from db import migrate
from db.session import make_engine
from devstack.fake_ollama import FakeOllama
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.queues import BULK, EMBED_SKILL

console = Console()
VARIANTS: dict[str, list[str]] = {
    "default": ["--loglevel=WARNING"],
    "no-events": ["--loglevel=WARNING"],  # with TASK_EVENTS=false
    "solo-pool": ["--loglevel=WARNING", "--pool=solo"],
    "prefetch-4": ["--loglevel=WARNING", "--prefetch-multiplier=4"],
    "info-log": ["--loglevel=INFO"],
}


def recorded_run(engine: sa.Engine, count: int) -> tuple[str, list[str]]:
    """A run of `count` items, every one already recorded (its batch went through)."""
    run_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO embedding_runs (id, total, unchanged, fanned_out, finished_at)"
                " VALUES (:id, :n, :n, true, now())"
            ),
            {"id": run_id, "n": count},
        )
        rows = connection.execute(
            sa.text(
                "INSERT INTO embedding_run_items (run_id, skill_id, tenant_id, position, outcome)"
                " SELECT :id, id, tenant_id, row_number() OVER (ORDER BY id), 'unchanged'"
                " FROM skills WHERE status = 'published' RETURNING skill_id"
            ),
            {"id": run_id},
        )
        skills = [str(row.skill_id) for row in rows]
    return run_id, skills


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def server_processes(port: int) -> list[psutil.Process]:
    """The server listening on `port` and its children (PostgreSQL forks a backend each)."""
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == "LISTEN":
            if connection.pid is None:
                continue
            parent = psutil.Process(connection.pid)
            return [parent, *parent.children(recursive=True)]
    return []


def drain(env: dict[str, str], options: list[str], queued: int, redis_url: str,
          pg_port: int, redis_port: int, log: Path) -> dict[str, float]:  # fmt: skip
    broker = redis_lib.Redis.from_url(redis_url)
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", *options],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        main = psutil.Process(worker.pid)
        while broker.llen(BULK) == queued:  # started consuming
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited: {log.read_text()[-2000:]}")
            time.sleep(0.001)
        started = time.perf_counter()
        parts = {
            "worker main": [main],
            "pool process": main.children(),
            "postgres": server_processes(pg_port),
            "redis": server_processes(redis_port),
        }
        before = {name: cpu_seconds(procs) for name, procs in parts.items()}
        while broker.llen(BULK) or broker.hlen("unacked"):
            time.sleep(0.002)
        seconds = time.perf_counter() - started
        after = {name: cpu_seconds(procs) for name, procs in parts.items()}
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, 15)
            worker.wait(30)
        broker.close()
    figures = {"ms_per_job": seconds / queued * 1000, "jobs_per_s": queued / seconds}
    for name in parts:
        figures[f"{name} cpu ms/job"] = (after[name] - before[name]) / queued * 1000
    return figures


def write_ceiling(engine: sa.Engine, count: int, batch: int = 32) -> dict[str, float]:
    """Our upsert of `count` vectors, `batch` a statement, with nothing else running: once with
    the app's HNSW index on skill_embeddings, once without it (dropped: a throwaway database)."""
    from db import services
    from db.session import make_session_factory, tenant_scope

    sessions = make_session_factory(engine)
    with engine.connect() as connection:
        skills = [
            str(r.id)
            for r in connection.execute(
                sa.text("SELECT id FROM skills WHERE status = 'published' ORDER BY id LIMIT :n"),
                {"n": count},
            )
        ]
    rng = random.Random(7)
    vectors = [[rng.gauss(0, 1) for _ in range(768)] for _ in range(len(skills))]
    figures: dict[str, float] = {}
    for label in ("with the HNSW index", "without it"):
        with engine.begin() as connection:
            connection.exec_driver_sql("TRUNCATE skill_embeddings")
        started = time.perf_counter()
        for start in range(0, len(skills), batch):
            rows = [
                {"tenant_id": TENANT, "skill_id": skill_id, "embedding": vectors[start + i],
                 "model_name": "nomic-embed-text", "dimensions": 768, "input_hash": "bench"}
                for i, skill_id in enumerate(skills[start : start + batch])
            ]  # fmt: skip
            with tenant_scope(sessions, TENANT) as session:
                services.upsert_skill_embeddings(session, rows)
        figures[f"rows/s {label}"] = len(skills) / (time.perf_counter() - started)
        with engine.begin() as connection:
            index = connection.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'skill_embeddings'"
                " AND indexdef ILIKE '%%hnsw%%'"
            ).scalar()
            if index:
                connection.exec_driver_sql(f'DROP INDEX "{index}"')
    figures["HNSW ms per row"] = (
        1000 / figures["rows/s with the HNSW index"] - 1000 / figures["rows/s without it"]
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_overhead", description=__doc__)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    redis = LocalRedis().start()
    ollama = FakeOllama().start()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "jobs": args.jobs}
    try:
        engine = make_engine(psycopg_url(pg.url()))
        migrate.upgrade(engine)
        seed_catalog(engine, args.jobs, ollama.url)
        env = {**os.environ, "DATABASE_URL": pg.url(), "REDIS_URL": redis.url,
               "OLLAMA_URL": ollama.url}  # fmt: skip
        producer = Celery("bench", broker=redis.url, set_as_current=False)
        for variant in args.variants:
            run_id, skills = recorded_run(engine, args.jobs)
            with producer.producer_or_acquire() as publisher:
                for skill_id in skills:
                    producer.send_task(
                        EMBED_SKILL,
                        kwargs={"skill_id": skill_id, "tenant_id": TENANT, "run_id": run_id},
                        queue=BULK,
                        producer=publisher,
                    )
            console.print(f"{variant}: draining {len(skills)} jobs")
            variant_env = {**env, "TASK_EVENTS": "false"} if variant == "no-events" else env
            results[variant] = drain(variant_env, VARIANTS[variant], len(skills), redis.url,
                                     pg.port, redis.port, work / f"{variant}.log")  # fmt: skip
        producer.close()
        console.print(f"PostgreSQL's write ceiling: {args.jobs} vectors, 32 a statement")
        results["write_ceiling"] = write_ceiling(engine, args.jobs)
        engine.dispose()
    finally:
        ollama.stop()
        redis.stop()
        pg.destroy()
    report(results, args.variants)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "job_overhead.json").write_text(json.dumps(results, indent=2))
    return 0


def report(results: dict[str, Any], variants: list[str]) -> None:
    table = Table(title=f"A job's cost, {results['jobs']} jobs", title_justify="left")
    table.add_column("measure")
    for variant in variants:
        table.add_column(variant, justify="right")
    for key in results[variants[0]]:
        table.add_row(key, *(f"{results[v][key]:.2f}" for v in variants))
    console.print(table)
    ceiling = Table(title="PostgreSQL's write ceiling (our upsert, alone)", title_justify="left")
    ceiling.add_column("measure")
    ceiling.add_column("value", justify="right")
    for key, value in results["write_ceiling"].items():
        ceiling.add_row(key, f"{value:.2f}")
    console.print(ceiling)


if __name__ == "__main__":
    raise SystemExit(main())
