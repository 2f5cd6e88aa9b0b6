"""The app's lane: what a publish costs, and how a burst of app jobs drains beside a backfill.

`python -m bench.app_lane` starts a throwaway PostgreSQL, Redis, a fake Ollama in its own process
(7.5 ms per request + 4.3 ms per input) and a worker, then measures in one run:

  (a) publish -> row: skills published one after another on an idle worker, each timed from
      `enqueue_embed_skill` to its row (p50, p95 of --publishes);
  (b) the floor of (a), in the same run, each after the same pause: a bare Celery job
      (bench.bare_app, the worker's options) from `send_task` to its body, plus one input's
      `/api/embed` to the same fake (the model's time and its HTTP), plus one vector upserted
      and committed (its HNSW insert) from the bench's own connection;
  (c) a burst of --burst app jobs (a reviewer approving a queue, a tenant importing its
      catalog), all queued at once, to the last of its jobs done; beside a backfill over as
      many other skills in the same run, from `celery call` to the last of its jobs done;
  (d) publish -> row while a --busy-skills backfill runs (p50, p95).

Results print as a table and go to bench/results/app_lane.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis as redis_lib
import sqlalchemy as sa
from celery import Celery
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from bench.from_command import CELERY, start_worker, stop
from bench.throughput import RESULTS, TENANT, percentile, psycopg_url, seed_catalog
from db import migrate, services
from db.session import make_engine
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.ollama import OllamaClient
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


class RowWatch:
    """When skills' rows are committed: a trigger of the bench's own database notifies at each
    commit, so a publish is timed to the moment its row becomes visible, and no polling
    query competes with the worker for the two cores."""

    def __init__(self, url: str) -> None:
        self.connection = psycopg.connect(url, autocommit=True)
        self.connection.execute(
            "CREATE OR REPLACE FUNCTION bench_row_written() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN PERFORM pg_notify('bench_rows', NEW.skill_id::text); RETURN NULL;"
            " END $$"
        )
        self.connection.execute(
            "CREATE TRIGGER bench_row_written AFTER INSERT OR UPDATE ON skill_embeddings"
            " FOR EACH ROW EXECUTE FUNCTION bench_row_written()"
        )
        self.connection.execute("LISTEN bench_rows")

    def wait(self, ids: list[str], timeout: float = 600) -> None:
        """Until each of `ids` has a row written after this call began."""
        left = set(ids)
        deadline = time.monotonic() + timeout
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{len(left)} skills were not embedded in time")
            for notice in self.connection.notifies(timeout=remaining, stop_after=1):
                left.discard(notice.payload)

    def close(self) -> None:
        self.connection.close()


def drained(redis_url: str) -> None:
    """Wait until no job waits in a queue or in a worker (kombu's unacked hash)."""
    client = redis_lib.Redis.from_url(redis_url)
    while any(client.llen(q) for q in (CELERY_DEFAULT, INTERACTIVE, BULK)) or client.hlen(
        "unacked"
    ):
        time.sleep(0.002)
    client.close()


def publish_one_by_one(
    engine: sa.Engine, watch: RowWatch, redis_url: str, count: int
) -> list[float]:
    latencies = []
    for skill_id in add_skills(engine, count, "Published"):
        started = time.perf_counter()
        enqueue_embed_skill(skill_id, TENANT, broker_url=redis_url)
        watch.wait([skill_id])
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    return latencies


def bare_publishes(env: dict[str, str], redis_url: str, count: int, work: Path) -> list[float]:
    """From `send_task` to the body of a job that does nothing (bench.bare_app's `bare.ping`,
    the worker's options), one by one on an idle worker: what Celery alone costs a publish."""
    app = Celery("bench", broker=redis_url, set_as_current=False)
    app.conf.task_send_sent_event = True  # as tasks.producer sends
    broker = redis_lib.Redis.from_url(redis_url)
    log = (work / "bare.log").open("wb")
    worker = subprocess.Popen([*CELERY, "-A", "bench.bare_app", "worker", "--loglevel=WARNING"],
                              env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    latencies = []
    try:
        app.send_task("bare.ping", args=["bench:pong"], queue="bare")
        if broker.blpop(["bench:pong"], timeout=120) is None:  # the worker is up
            raise RuntimeError(f"the bare worker did not answer: {log.name}")
        for _ in range(count):
            time.sleep(0.05)
            started = time.perf_counter()
            app.send_task("bare.ping", args=["bench:pong"], queue="bare")
            broker.blpop(["bench:pong"], timeout=60)
            latencies.append(time.perf_counter() - started)
    finally:
        stop(worker)
        log.close()
        broker.close()
        app.close()
    return latencies


def upsert_commits(engine: sa.Engine, count: int) -> list[float]:
    """One vector upserted and committed, as the worker writes it: PostgreSQL's part of a
    publish (its HNSW insert), from this process's own connection."""
    latencies = []
    with engine.connect() as connection:
        for skill_id in add_skills(engine, count, "Written"):
            vector = [random.uniform(-1, 1) for _ in range(768)]
            started = time.perf_counter()
            with Session(bind=connection) as session:
                services.upsert_skill_embeddings(session, [{
                    "tenant_id": TENANT, "skill_id": skill_id, "embedding": vector,
                    "model_name": "nomic-embed-text", "dimensions": 768, "input_hash": "x",
                }])  # fmt: skip
                session.commit()
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    return latencies


def model_requests(ollama_url: str, count: int) -> list[float]:
    """One input's `/api/embed` as a client sees it after a pause: the model's time plus the
    HTTP exchange and the wake-ups around it (no slot, no database)."""
    client = OllamaClient(ollama_url)
    latencies = []
    try:
        for number in range(count):
            time.sleep(0.05)
            started = time.perf_counter()
            client.embed([f"A skill asked for alone, number {number}"], model="nomic-embed-text",
                         dimensions=768)  # fmt: skip
            latencies.append(time.perf_counter() - started)
    finally:
        client.close()
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
        watch = RowWatch(pg.url())
        publish_one_by_one(engine, watch, redis.url, 3)  # warm: connections, the first vectors
        console.print(f"(a) {args.publishes} publishes one by one, idle worker")
        latencies = publish_one_by_one(engine, watch, redis.url, args.publishes)
        results["publish_idle_ms"] = {"p50": statistics.median(latencies) * 1000,
                                      "p95": percentile(latencies, 0.95) * 1000}  # fmt: skip
        results["model_ms_one"] = args.request_ms + args.input_ms

        console.print("(b) the floor: a bare Celery job's publish, one upsert's commit")
        bare = bare_publishes(env, redis.url, args.publishes, work)
        model = model_requests(fake.url, args.publishes)
        upsert = upsert_commits(engine, args.publishes)
        results["floor_ms"] = {"bare_publish": statistics.median(bare) * 1000,
                               "model_request": statistics.median(model) * 1000,
                               "upsert_commit": statistics.median(upsert) * 1000}  # fmt: skip

        console.print(f"(c) a burst of {args.burst} app jobs, and a backfill of as many")
        burst = add_skills(engine, args.burst, "Imported")
        started = time.perf_counter()
        for skill_id in burst:
            enqueue_embed_skill(skill_id, TENANT, broker_url=redis.url)
        watch.wait(burst)
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

        console.print(f"(d) publishes during a {args.busy_skills}-skill backfill")
        add_skills(engine, args.busy_skills, "Busy")
        subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        busy = publish_one_by_one(engine, watch, redis.url, args.publishes)
        results["publish_busy_ms"] = {"p50": statistics.median(busy) * 1000,
                                      "p95": percentile(busy, 0.95) * 1000}  # fmt: skip
        watch.close()
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
    floor = r["floor_ms"]
    table.add_row("  floor: bare Celery publish -> body + one /api/embed request + one"
                  " upsert committed",
                  f"{floor['bare_publish']:.1f} + {floor['model_request']:.1f} +"
                  f" {floor['upsert_commit']:.1f} = {sum(floor.values()):.1f} ms", "")  # fmt: skip
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
