"""How soon is a skill the app publishes embedded, idle and beside a backfill, and what do
its parts and a burst of such jobs cost?

`python -m bench.app_lane` starts a throwaway stack, a fake Ollama in its own process (7.5 ms
per request + 4.3 ms per input) and a worker, then measures in one run:

  (a) publish -> row: skills published one after another on an idle worker, each timed from
      `enqueue_embed_skill` to its row (p50, p95 of --publishes);
  (b) the floor of (a), in the same run, each after the same pause: a bare Celery job
      (bench.bare_app, the worker's options) from `send_task` to its body, plus one input's
      `/api/embed` to the same fake (the model's time and its HTTP), plus one vector upserted
      and committed (its HNSW insert) from the bench's own connection;
  (c) a burst of --burst app jobs (a reviewer approving a queue, a tenant importing its
      catalog), all queued at once, to the last of its jobs done; beside a backfill over as
      many other skills in the same run, from `celery call` to the last of its jobs done;
  (d) publish -> row while a --busy-skills backfill runs (p50, p95, max);
  (e) `enqueue_embed_skill` itself: --enqueues calls with Redis up (p50, p99).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
import uuid

import redis as redis_lib
import sqlalchemy as sa
from celery import Celery

from bench.harness import Results, RowWatch, console, drained, percentile
from bench.harness import backfill as timed_backfill
from db import catalog
from db.sql import scope_to_tenant
from devstack import seed
from devstack.seed import TENANT
from devstack.stack import CELERY, Stack, stack
from tasks import enqueue_embed_skill
from tasks.ollama import OllamaClient


def add_skills(engine: sa.Engine, count: int, label: str) -> list[str]:
    """`count` published skills of the default tenant, made now; their ids."""
    return seed.seed_catalog(engine, count, drafts=False, label=label)


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


def upsert_commits(engine: sa.Engine, count: int) -> list[float]:
    """One vector upserted and committed, as the worker writes it: PostgreSQL's part of a
    publish (its HNSW insert), from this process's own connection."""
    latencies = []
    with engine.connect() as connection:
        for skill_id in add_skills(engine, count, "Written"):
            vector = [random.uniform(-1, 1) for _ in range(768)]
            started = time.perf_counter()
            with connection.begin():
                scope_to_tenant(connection, TENANT)
                catalog.write_current(connection, TENANT, [
                    catalog.VectorRow(skill_id, "", vector, "nomic-embed-text", 768, "x")
                ], checked=False)  # fmt: skip
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


def bare_publishes(s: Stack, env: dict[str, str], count: int) -> list[float]:
    """From `send_task` to the body of a job that does nothing (bench.bare_app's `bare.ping`,
    the worker's options), one by one on an idle worker: what Celery alone costs a publish."""
    app = Celery("bench", broker=s.redis_url, set_as_current=False)
    app.conf.task_send_sent_event = True  # as tasks sends
    broker = redis_lib.Redis.from_url(s.redis_url)
    worker = s.worker(env, app="bench.bare_app", name="bare")
    latencies = []
    try:
        app.send_task("bare.ping", args=["bench:pong"], queue="bare")  # warms its connections
        if broker.blpop(["bench:pong"], timeout=120) is None:
            raise RuntimeError(f"the bare worker did not answer: {worker.log()[-2000:]}")
        for _ in range(count):
            time.sleep(0.05)
            started = time.perf_counter()
            app.send_task("bare.ping", args=["bench:pong"], queue="bare")
            broker.blpop(["bench:pong"], timeout=60)
            latencies.append(time.perf_counter() - started)
    finally:
        worker.stop()
        broker.close()
        app.close()
    return latencies


def enqueue_latency(redis_url: str, calls: int) -> list[float]:
    enqueue_embed_skill("warm-up", TENANT, broker_url=redis_url)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        enqueue_embed_skill(str(uuid.uuid4()), TENANT, broker_url=redis_url)
        latencies.append(time.perf_counter() - started)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app_lane", description=__doc__)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--burst", type=int, default=600)
    parser.add_argument("--busy-skills", type=int, default=5000)
    parser.add_argument("--enqueues", type=int, default=2000)
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    args = parser.parse_args(argv)
    results = Results("app_lane", publishes=args.publishes, burst=args.burst,
                      busy_skills=args.busy_skills, enqueues=args.enqueues,
                      cost_model_ms=[args.request_ms, args.input_ms])  # fmt: skip
    with stack(prefix="bench-app-lane-") as s:
        fake = s.fake(args.request_ms, args.input_ms)
        seed.add_tenants(s.engine, ollama_url=fake.url)
        env = s.env(fake.url)
        s.worker(env)
        watch = RowWatch(s.database_url)
        publish_one_by_one(s.engine, watch, s.redis_url, 3)  # warm: connections, first vectors
        console.print(f"(a) {args.publishes} publishes one by one, idle worker")
        idle = publish_one_by_one(s.engine, watch, s.redis_url, args.publishes)
        results.add("publish -> row, idle worker, p50", statistics.median(idle) * 1000, "ms",
                    limit=("the model's time", args.request_ms + args.input_ms))  # fmt: skip
        results.add("publish -> row, idle worker, p95", percentile(idle, 0.95) * 1000, "ms")

        console.print("(b) the floor: a bare Celery job's publish, one request, one upsert")
        floor = {
            "bare Celery publish -> body": bare_publishes(s, env, args.publishes),
            "one /api/embed request": model_requests(fake.url, args.publishes),
            "one upsert committed": upsert_commits(s.engine, args.publishes),
        }
        for name, seconds in floor.items():
            results.add(f"floor: {name}, p50", statistics.median(seconds) * 1000, "ms")
        total = sum(statistics.median(seconds) for seconds in floor.values())
        results.add("floor: the three together", total * 1000, "ms")
        # An absolute figure moves with this machine's hour; its ratio to the floor does not.
        results.add("publish -> row, idle worker, p50 / the floor", statistics.median(idle) / total,
                    "x", target="<= 1.1x")  # fmt: skip

        console.print(f"(c) a burst of {args.burst} app jobs, and a backfill of as many")
        burst = add_skills(s.engine, args.burst, "Imported")
        started = time.perf_counter()
        for skill_id in burst:
            enqueue_embed_skill(skill_id, TENANT, broker_url=s.redis_url)
        watch.wait(burst)
        drained(s.redis_url)  # every job of the burst done, each with its own outcome
        burst_s = time.perf_counter() - started
        add_skills(s.engine, args.burst, "Backfilled")
        run = timed_backfill(s.engine, env, drain=True)
        backfill_s = run.drained_s or run.summary_s
        results.add(f"burst of {args.burst} app jobs", burst_s, "s")
        results.add(f"burst of {args.burst} app jobs, rate", args.burst / burst_s, "jobs/s")
        results.add("backfill over as many skills, rate", args.burst / backfill_s, "skills/s")
        results.add("burst rate / backfill rate", backfill_s / burst_s, "x", target=">= 0.8x")

        console.print(f"(d) publishes during a {args.busy_skills}-skill backfill")
        add_skills(s.engine, args.busy_skills, "Busy")
        subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        busy = publish_one_by_one(s.engine, watch, s.redis_url, args.publishes)
        results.add("publish -> row during a backfill, p50", statistics.median(busy) * 1000, "ms")
        results.add("publish -> row during a backfill, p95", percentile(busy, 0.95) * 1000, "ms",
                    target="<= 1000 ms")  # fmt: skip
        results.add("publish -> row during a backfill, max", max(busy) * 1000, "ms")
        watch.close()
        drained(s.redis_url)

        console.print(f"(e) enqueue_embed_skill x {args.enqueues}")
        enqueues = enqueue_latency(s.redis_url, args.enqueues)
        results.add("enqueue_embed_skill, p50", statistics.median(enqueues) * 1000, "ms")
        results.add("enqueue_embed_skill, p99", percentile(enqueues, 0.99) * 1000, "ms",
                    target="<= 5 ms")  # fmt: skip
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
