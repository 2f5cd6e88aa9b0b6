"""The app's lane: what a publish costs, and how a burst of app jobs drains beside a backfill.

`python -m bench.app_lane` starts a throwaway PostgreSQL, Redis, a fake Ollama in its own process
(7.5 ms per request + 4.3 ms per input) and a worker, then measures in one run:

  (a) publish -> row: skills published one after another on an idle worker, each timed from
      `enqueue_embed_skill` to its row (p50, p95 of --publishes);
  (b) a burst of --burst app jobs (a reviewer approving a queue, a tenant importing its
      catalog), all queued at once, to the last of its jobs done; beside a backfill over as
      many other skills in the same run, from `celery call` to the last of its jobs done;
  (c) publish -> row while a --busy-skills backfill runs (p50, p95).

Results print as a table and go to bench/results/app_lane.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis as redis_lib
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bench.from_command import CELERY, start_worker, stop
from bench.throughput import RESULTS, TENANT, percentile, psycopg_url, seed_catalog
from db import migrate
from db.session import make_engine
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.producer import enqueue_embed_skill
from tasks.queues import BULK, CELERY_DEFAULT, INTERACTIVE

console = Console()


def add_skills(engine: sa.Engine, count: int, label: str) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO skills (id, tenant_id, name, description, status)"
                " SELECT id, :t, :label || ' ' || n, 'Reads the input and writes it up. ' || n,"
                " 'published' FROM unnest(CAST(:ids AS text[])) WITH ORDINALITY AS u(id, n)"
            ),
            {"t": TENANT, "label": label, "ids": ids},
        )
    return ids


def wait_rows(engine: sa.Engine, ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    with engine.connect() as connection:
        while connection.execute(
            sa.text("SELECT count(*) FROM skill_embeddings WHERE skill_id = ANY(:ids)"),
            {"ids": ids},
        ).scalar() != len(ids):
            connection.commit()
            if time.monotonic() > deadline:
                raise RuntimeError("skills were not embedded in time")
            time.sleep(0.001)


def drained(redis_url: str) -> None:
    """Wait until no job waits in a queue or in a worker (kombu's unacked hash)."""
    client = redis_lib.Redis.from_url(redis_url)
    while any(client.llen(q) for q in (CELERY_DEFAULT, INTERACTIVE, BULK)) or client.hlen(
        "unacked"
    ):
        time.sleep(0.002)
    client.close()


def publish_one_by_one(engine: sa.Engine, redis_url: str, count: int) -> list[float]:
    latencies = []
    for skill_id in add_skills(engine, count, "Published"):
        started = time.perf_counter()
        enqueue_embed_skill(skill_id, TENANT, broker_url=redis_url)
        wait_rows(engine, [skill_id])
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app_lane", description=__doc__)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--burst", type=int, default=600)
    parser.add_argument("--busy-skills", type=int, default=5000)
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-app-lane-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    redis = LocalRedis().start()
    fake = FakeOllamaProcess(args.request_ms, args.input_ms, work / "fake.log")
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    worker: subprocess.Popen[bytes] | None = None
    try:
        engine = make_engine(psycopg_url(pg.url()))
        migrate.upgrade(engine)
        seed_catalog(engine, 0, fake.url)
        env = {**os.environ, "DATABASE_URL": pg.url(), "REDIS_URL": redis.url,
               "OLLAMA_URL": fake.url}  # fmt: skip
        worker, _ = start_worker(["-A", "worker", "worker"], env, work / "w.log", work / "h")
        publish_one_by_one(engine, redis.url, 3)  # warm: connections, the first vectors
        console.print(f"(a) {args.publishes} publishes one by one, idle worker")
        latencies = publish_one_by_one(engine, redis.url, args.publishes)
        results["publish_idle_ms"] = {"p50": statistics.median(latencies) * 1000,
                                      "p95": percentile(latencies, 0.95) * 1000}  # fmt: skip
        results["model_ms_one"] = args.request_ms + args.input_ms

        console.print(f"(b) a burst of {args.burst} app jobs, and a backfill of as many")
        burst = add_skills(engine, args.burst, "Imported")
        started = time.perf_counter()
        for skill_id in burst:
            enqueue_embed_skill(skill_id, TENANT, broker_url=redis.url)
        wait_rows(engine, burst)
        drained(redis.url)  # every job of the burst done, each with its own outcome
        burst_s = time.perf_counter() - started
        add_skills(engine, args.burst, "Backfilled")
        started = time.perf_counter()
        subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        with engine.connect() as connection:
            while connection.execute(
                sa.text("SELECT count(*) FROM embedding_runs WHERE finished_at IS NULL")
            ).scalar() or not connection.execute(sa.text("SELECT count(*) FROM embedding_runs")
                                                  ).scalar():  # fmt: skip
                connection.commit()
                time.sleep(0.003)
        drained(redis.url)
        backfill_s = time.perf_counter() - started
        results["burst"] = {"jobs": args.burst, "seconds": burst_s,
                            "per_s": args.burst / burst_s,
                            "backfill_per_s": args.burst / backfill_s,
                            "ratio": backfill_s / burst_s}  # fmt: skip

        console.print(f"(c) publishes during a {args.busy_skills}-skill backfill")
        add_skills(engine, args.busy_skills, "Busy")
        subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        busy = publish_one_by_one(engine, redis.url, args.publishes)
        results["publish_busy_ms"] = {"p50": statistics.median(busy) * 1000,
                                      "p95": percentile(busy, 0.95) * 1000}  # fmt: skip
        engine.dispose()
    finally:
        if worker is not None:
            stop(worker)
        fake.stop()
        redis.stop()
        pg.destroy()
    report(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "app_lane.json").write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict[str, Any]) -> None:
    table = Table(title="The app's lane", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    idle = r["publish_idle_ms"]
    table.add_row("publish -> row, idle worker, p50 / p95",
                  f"{idle['p50']:.1f} / {idle['p95']:.1f} ms (model {r['model_ms_one']:.1f})",
                  "p50 <= 22 ms")  # fmt: skip
    b = r["burst"]
    table.add_row(
        f"burst of {b['jobs']} app jobs", f"{b['seconds']:.2f} s ({b['per_s']:.0f}/s)", ""
    )
    table.add_row("backfill over as many skills", f"{b['backfill_per_s']:.0f}/s", "")
    table.add_row("burst rate / backfill rate", f"{b['ratio']:.2f}x", ">= 0.8x")
    busy = r["publish_busy_ms"]
    table.add_row("publish -> row during a backfill, p50 / p95",
                  f"{busy['p50']:.0f} / {busy['p95']:.0f} ms", "p95 <= 1000 ms")  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main())
