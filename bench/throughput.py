"""Backfill throughput against the seed's sequential loop, plus latency figures.

`python -m bench.throughput` runs, on one throwaway PostgreSQL, Redis and fake Ollama whose cost
is a fixed time per request plus a time per input (default: what all-MiniLM-L6-v2 costs on a
2-core CPU, 7.5 ms + 4.3 ms):

  (a) the seed plan's loop: select published skills; for each, POST /api/embed and upsert;
  (b) `tasks.backfill` through a real worker, same catalog, same fake;
  (c) publish -> row latency (p50/p95) while a backfill of --busy-skills runs;
  (d) enqueue_embed_skill latency (p50/p99) with Redis up;
  (e) a second backfill over --unchanged-skills unchanged skills: time and Ollama inputs;
  (f) the worker's RSS.

Results print as a table and go to bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis as redis_lib
import sqlalchemy as sa
from celery import Celery
from rich.console import Console
from rich.table import Table

from db import migrate, services
from db.session import make_engine, make_session_factory, tenant_scope
from devstack.fake_ollama import FakeOllama
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.producer import enqueue_embed_skill
from tasks.queues import BULK, INTERACTIVE
from tasks.text import input_hash, skill_text

TENANT = "default-tenant-000-0000-000000000000"
RESULTS = Path(__file__).parent / "results"
console = Console()


def psycopg_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://")


def seed_catalog(engine: sa.Engine, count: int, ollama_url: str) -> None:
    """`count` published skills (plus a few drafts) with realistic lengths, made in SQL."""
    with engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE skills, skill_embeddings, embedding_runs CASCADE")
        connection.execute(
            sa.text("INSERT INTO tenants (id, name) VALUES (:t, 'Default') ON CONFLICT DO NOTHING"),
            {"t": TENANT},
        )
        connection.execute(
            sa.text(
                "INSERT INTO site_settings (id, tenant_id, semantic_similarity_enabled, ollama_url)"
                " VALUES ('default', :t, true, :url) ON CONFLICT (tenant_id)"
                " DO UPDATE SET ollama_url = EXCLUDED.ollama_url"
            ),
            {"t": TENANT, "url": ollama_url},
        )
        connection.execute(
            sa.text(
                """
                INSERT INTO skills (id, tenant_id, name, description, status)
                SELECT gen_random_uuid()::text, :t, 'Skill ' || n || ': review and summarise',
                       repeat('Reads the input, finds what matters and writes it up. ', 3) || n,
                       CASE WHEN n % 20 = 0 THEN 'draft' ELSE 'published' END
                FROM generate_series(1, :n) AS n
                """
            ),
            {"t": TENANT, "n": int(count * 20 / 19) + 1},
        )
        connection.exec_driver_sql(
            "DELETE FROM skills WHERE id IN (SELECT id FROM skills WHERE status = 'published'"
            f" ORDER BY id OFFSET {count})"
        )


def clear_embeddings(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE skill_embeddings, embedding_runs CASCADE")


def sequential_loop(database_url: str, ollama_url: str) -> tuple[int, float]:
    """The seed plan, faithfully: one POST and one committed upsert per skill, in order."""
    engine = make_engine(psycopg_url(database_url))
    sessions = make_session_factory(engine)
    started = time.perf_counter()
    with tenant_scope(sessions, TENANT) as session:
        skills = list(services.iter_published_skills(session, TENANT))
    with httpx.Client(timeout=10.0) as client:
        for skill in skills:
            text = skill_text(skill.name, skill.description)
            response = client.post(
                f"{ollama_url}/api/embed", json={"model": "nomic-embed-text", "input": text}
            )
            response.raise_for_status()
            with tenant_scope(sessions, TENANT) as session:
                services.upsert_skill_embedding(
                    session,
                    tenant_id=TENANT,
                    skill_id=skill.id,
                    embedding=response.json()["embeddings"][0],
                    model_name="nomic-embed-text",
                    dimensions=768,
                    input_hash=input_hash(text),
                )
    elapsed = time.perf_counter() - started
    engine.dispose()
    return len(skills), elapsed


@dataclass(frozen=True)
class BackfillTiming:
    """Seconds from queuing `tasks.backfill` to: the first row, the run's summary, the last job."""

    first_row: float
    summary: float
    drained: float
    total: int
    unchanged: int


def backfill_through_worker(
    engine: sa.Engine, redis_url: str, *, follow_jobs: bool = False
) -> BackfillTiming:
    """Queue `tasks.backfill` and time it in this process, like (a).

    The summary comes once every skill is recorded; with `follow_jobs`, also wait for the last
    of the run's jobs (each confirms its skill's outcome) to leave the queue and the worker."""
    app = Celery("bench", broker=redis_url, set_as_current=False)
    broker = redis_lib.Redis.from_url(redis_url)
    started = time.perf_counter()
    run_id = app.send_task("tasks.backfill", queue=INTERACTIVE).id
    deadline = started + 1800
    first_row = None
    with engine.connect() as connection:
        while True:
            row = connection.execute(
                sa.text(
                    "SELECT total, unchanged, failed, finished_at,"
                    " EXISTS (SELECT 1 FROM skill_embeddings) AS written"
                    " FROM embedding_runs WHERE id = :id"
                ),
                {"id": run_id},
            ).one_or_none()
            connection.commit()
            if first_row is None and row is not None and row.written:
                first_row = time.perf_counter() - started
            if row is not None and row.finished_at is not None:
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"backfill {run_id} did not finish in 30 minutes")
            time.sleep(0.002)
    summary = time.perf_counter() - started
    drained = summary
    if follow_jobs:
        # Kombu keeps messages a worker holds in the "unacked" hash until it acks them.
        while broker.llen(BULK) or broker.llen(INTERACTIVE) or broker.hlen("unacked"):
            time.sleep(0.005)
        drained = time.perf_counter() - started
    app.close()
    broker.close()
    if row.failed:
        raise RuntimeError(f"backfill {run_id} had {row.failed} failures")
    return BackfillTiming(first_row or summary, summary, drained, int(row.total),
                          int(row.unchanged))  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def publish_latency(
    engine: sa.Engine, env: dict[str, str], redis_url: str, publishes: int
) -> list[float]:
    """Publish skills one by one while a backfill runs; time each from enqueue to its row."""
    backfill = subprocess.Popen(
        [sys.executable, "-m", "worker", "backfill", "--wait", "--timeout", "1800"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with engine.connect() as connection:  # wait until the backfill is under way
        while not connection.execute(sa.text("SELECT count(*) FROM skill_embeddings")).scalar():
            time.sleep(0.05)
            connection.commit()
    latencies: list[float] = []
    for i in range(publishes):
        skill_id = str(uuid.uuid4())
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO skills (id, tenant_id, name, description, status)"
                    " VALUES (:id, :t, :name, 'Published during a backfill', 'published')"
                ),
                {"id": skill_id, "t": TENANT, "name": f"Urgent skill {i}"},
            )
        started = time.perf_counter()
        enqueue_embed_skill(skill_id, TENANT, broker_url=redis_url)
        with engine.connect() as connection:
            while not connection.execute(
                sa.text("SELECT 1 FROM skill_embeddings WHERE skill_id = :s"), {"s": skill_id}
            ).scalar():
                time.sleep(0.005)
                connection.commit()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.2)
    backfill.wait()
    return latencies


def enqueue_latency(redis_url: str, calls: int) -> list[float]:
    enqueue_embed_skill("warm-up", TENANT, broker_url=redis_url)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        enqueue_embed_skill(str(uuid.uuid4()), TENANT, broker_url=redis_url)
        latencies.append(time.perf_counter() - started)
    return latencies


def tree_rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    members = [process, *process.children(recursive=True)]
    return sum(int(p.memory_info().rss) for p in members) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--skills", type=int, default=1000)
    parser.add_argument("--zero-cost-skills", type=int, default=3000)
    parser.add_argument("--busy-skills", type=int, default=5000)
    parser.add_argument("--unchanged-skills", type=int, default=10000)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--enqueues", type=int, default=2000)
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    redis = LocalRedis().start()
    ollama = FakeOllama(
        request_latency=args.request_ms / 1000, input_latency=args.input_ms / 1000
    ).start()
    worker: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "batch_size": args.batch_size,
    }
    try:
        database_url = pg.url()
        engine = make_engine(psycopg_url(database_url))
        migrate.upgrade(engine)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis.url,
            "OLLAMA_URL": ollama.url,
            "EMBED_BATCH_SIZE": str(args.batch_size),
        }
        log = (work / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=WARNING"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        time.sleep(3)

        for phase, skills, request_ms, input_ms in (
            ("cpu_model", args.skills, args.request_ms, args.input_ms),
            ("zero_cost", args.zero_cost_skills, 0.0, 0.0),
        ):
            console.print(f"(a)/(b) {skills} skills, cost {request_ms} + {input_ms} ms")
            ollama.request_latency, ollama.input_latency = request_ms / 1000, input_ms / 1000
            seed_catalog(engine, skills, ollama.url)
            count, seq_seconds = sequential_loop(database_url, ollama.url)
            clear_embeddings(engine)
            ollama.reset()
            timing = backfill_through_worker(engine, redis.url, follow_jobs=True)
            batch_ms = request_ms + args.batch_size * input_ms
            results[phase] = {
                "skills": count,
                "cost_model_ms": {"request": request_ms, "input": input_ms},
                "sequential_per_s": count / seq_seconds,
                "backfill_per_s": count / timing.summary,
                "backfill_jobs_drained_per_s": count / timing.drained,
                "speedup": seq_seconds / timing.summary,
                "model_limit_per_s": args.batch_size / batch_ms * 1000 if batch_ms else None,
                "first_row_s": timing.first_row,
                "ollama_requests": ollama.requests,
                "ollama_inputs": ollama.inputs,
            }
        ollama.request_latency = args.request_ms / 1000
        ollama.input_latency = args.input_ms / 1000

        console.print(f"(c) publish -> row during a {args.busy_skills}-skill backfill")
        seed_catalog(engine, args.busy_skills, ollama.url)
        latencies = publish_latency(engine, env, redis.url, args.publishes)
        results["publish_to_row_s"] = {
            "p50": statistics.median(latencies),
            "p95": percentile(latencies, 0.95),
            "max": max(latencies),
            "n": len(latencies),
        }

        console.print(f"(d) enqueue_embed_skill x {args.enqueues}")
        enqueues = enqueue_latency(redis.url, args.enqueues)
        results["enqueue_ms"] = {
            "p50": statistics.median(enqueues) * 1000,
            "p99": percentile(enqueues, 0.99) * 1000,
        }
        # Drop those jobs: their skills do not exist.
        subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", "purge", "-f"],
            env=env,
            capture_output=True,
        )

        console.print(f"(e) second backfill over {args.unchanged_skills} unchanged skills")
        seed_catalog(engine, args.unchanged_skills, ollama.url)
        backfill_through_worker(engine, redis.url)
        ollama.reset()
        timing = backfill_through_worker(engine, redis.url)
        results["unchanged_backfill"] = {
            "skills": timing.total,
            "found_unchanged": timing.unchanged,
            "seconds": timing.summary,
            "ollama_inputs": ollama.inputs,
        }
        results["worker_rss_mb"] = tree_rss_mb(worker.pid)
        engine.dispose()
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, 15)
            worker.wait(30)
        ollama.stop()
        redis.stop()
        pg.destroy()

    report(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict[str, Any]) -> None:
    table = Table(title="everyskill-embedder throughput", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for phase in ("cpu_model", "zero_cost"):
        x = r[phase]
        cost = f"{x['cost_model_ms']['request']} + {x['cost_model_ms']['input']} ms"
        table.add_row(f"[bold]{x['skills']} skills, model cost {cost}", "", "")
        table.add_row("  seed plan's loop", f"{x['sequential_per_s']:.1f} skills/s", "")
        limit = x["model_limit_per_s"]
        share = (
            f" ({x['backfill_per_s'] / limit:.2f}x the model limit {limit:.0f}/s)" if limit else ""
        )
        table.add_row(
            "  tasks.backfill to its summary",
            f"{x['backfill_per_s']:.1f} skills/s{share}",
            ">= 0.9x the limit" if limit else ">= 500/s",
        )
        table.add_row("  speed-up over the seed loop", f"{x['speedup']:.2f}x",
                      ">= 3.4x" if limit else ">= 3x")  # fmt: skip
        table.add_row("  ... to its last job confirmed",
                      f"{x['backfill_jobs_drained_per_s']:.1f} skills/s", "")  # fmt: skip
        table.add_row("  call -> first row written", f"{x['first_row_s']:.3f} s", "<= 0.5 s")
        table.add_row("  Ollama requests / inputs",
                      f"{x['ollama_requests']} / {x['ollama_inputs']}", "")  # fmt: skip
    p = r["publish_to_row_s"]
    table.add_row("publish -> row p50 / p95", f"{p['p50']:.3f} / {p['p95']:.3f} s", "p95 <= 1 s")
    e = r["enqueue_ms"]
    table.add_row(
        "enqueue_embed_skill p50 / p99", f"{e['p50']:.2f} / {e['p99']:.2f} ms", "p99 <= 5 ms"
    )
    u = r["unchanged_backfill"]
    table.add_row(
        f"backfill over {u['skills']} skills ({u['found_unchanged']} unchanged)",
        f"{u['seconds']:.2f} s, {u['ollama_inputs']} inputs",
        "<= 5 s, 0 inputs",
    )
    table.add_row("worker RSS (main + pool)", f"{r['worker_rss_mb']:.0f} MB", "")
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main())
