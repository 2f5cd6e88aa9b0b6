"""What does one `tasks.embed_skill` cost when there is no model work at all, and what does
each worker option change in it?

`python -m bench.job_overhead [--jobs 3000]` records a run whose N items all have their
outcome already (what a job meets once its batch has gone through), queues one
`tasks.embed_skill` per item while no worker runs, then starts a real worker and times it
draining the queue, with the CPU time of the worker's main process, its pool process, Redis and
PostgreSQL per job.

Then PostgreSQL's write ceiling: our upsert of the same number of vectors, 32 a statement, with
nothing else running, with and without the app's HNSW index.

Variants (`--variants`) change one worker option at a time, so each choice's cost is measured:
`default`, `no-events` (TASK_EVENTS=false: Flower would see no jobs), `solo-pool` (the job runs
in the worker's main process), `prefetch-4` (four messages reserved at a time), `info-log`
(Celery's two log lines per job).
"""

from __future__ import annotations

import argparse
import time
import uuid

import redis as redis_lib
import sqlalchemy as sa
from celery import Celery

from bench.harness import CpuSampler, Results, console, write_ceiling
from devstack import seed
from devstack.seed import TENANT
from devstack.stack import Stack, stack
from tasks import BULK, EMBED_SKILL

# loglevel, options
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("WARNING", []),
    "no-events": ("WARNING", []),  # with TASK_EVENTS=false
    "solo-pool": ("WARNING", ["--pool=solo"]),
    "prefetch-4": ("WARNING", ["--prefetch-multiplier=4"]),
    "info-log": ("INFO", []),
}


def recorded_run(engine: sa.Engine) -> tuple[str, list[str]]:
    """A run over the published skills, every item already recorded (its batch went through)."""
    run_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO embedding_runs (id, total, unchanged, fanned_out, finished_at)"
                " SELECT :id, count(*), count(*), true, now() FROM skills"
                " WHERE status = 'published'"
            ),
            {"id": run_id},
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


def drain(s: Stack, env: dict[str, str], variant: str) -> dict[str, float]:
    """Start the variant's worker on the queued jobs; per job, from the moment it consumes."""
    broker = redis_lib.Redis.from_url(s.redis_url)
    loglevel, options = VARIANTS[variant]
    worker = s.worker(env, name=variant, loglevel=loglevel, options=options)
    parts = {"worker main": (worker.pid, "root"), "pool process": (worker.pid, "descendants"),
             "postgres": (s.postgres_pid, "tree"), "redis": (s.redis_pid, "tree")}  # fmt: skip
    cpu = CpuSampler(parts)
    started = time.perf_counter()
    left = int(broker.llen(BULK)) or 1
    while broker.llen(BULK) or broker.hlen("unacked"):
        time.sleep(0.002)
    seconds = time.perf_counter() - started
    used = cpu.stop().used()
    worker.stop()
    broker.close()
    figures = {"wall ms/job": seconds / left * 1000, "jobs/s": left / seconds}
    return figures | {f"{name} CPU ms/job": used[name] / left * 1000 for name in parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.job_overhead", description=__doc__)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    results = Results("job_overhead", jobs=args.jobs, variants=args.variants)
    with stack(prefix="bench-jobs-") as s:
        fake = s.fake()
        seed.add_tenants(s.engine, ollama_url=fake.url)
        seed.seed_catalog(s.engine, args.jobs)
        env = s.env(fake.url)
        producer = Celery("bench", broker=s.redis_url, set_as_current=False)
        for variant in args.variants:
            run_id, skills = recorded_run(s.engine)
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
            for name, value in drain(s, variant_env, variant).items():
                results.add(f"{variant}: {name}", value, name.split()[-1])
        producer.close()
        console.print(f"PostgreSQL's write ceiling: {args.jobs} vectors, 32 a statement")
        ceiling = write_ceiling(s.engine, args.jobs)
        results.add("our upsert, one connection, with the HNSW index",
                    ceiling["with_index_rows_per_s"], "rows/s")  # fmt: skip
        results.add("our upsert, one connection, without it", ceiling["without_index_rows_per_s"],
                    "rows/s")  # fmt: skip
        results.add("the HNSW index per row", ceiling["index_ms_per_row"], "ms")
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
