"""Where a lone publish's time goes, step by step, across the processes it crosses.

`python -m bench.publish_steps` starts a throwaway stack (PostgreSQL, Redis, a fake Ollama in
its own process at 7.5 ms per request + 4.3 ms per input) and `celery -A bench.traced_worker
worker` (the embedder's worker with a clock at each step), then publishes skills one by one on
the idle worker, --pause apart (each skill created just before its publish), as
bench.app_lane's part (a) does. Each publish is timed from `enqueue_embed_skill` to its row's
commit, seen by a notification, and cut at the worker's steps: the main process has the
message (Celery's task_received), the pool process starts the job (task_prerun), the first
look is done, Ollama is asked (its slot taken first), the answer is parsed. The p50 of each
step is printed; the steps' p50s need not add up to the total's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.app_lane import RowWatch, add_skills
from bench.from_command import start_worker, stop
from bench.throughput import TENANT, psycopg_url, seed_catalog
from db import migrate
from db.session import make_engine
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.producer import enqueue_embed_skill

console = Console()
STEPS = (
    ("enqueued", "received", "enqueue_embed_skill until the worker has the message"),
    ("received", "prerun", "Celery: the main process hands the job to the pool process"),
    ("prerun", "looked", "the job starts; its first look (one Redis script)"),
    ("looked", "fetching", "load and decide, committed"),
    ("fetching", "fetched", "Ollama: slot, request (model 11.8 ms), answer parsed"),
    ("fetched", "row", "the write, committed and seen"),
    ("enqueued", "row", "publish -> row"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_steps", description=__doc__)
    parser.add_argument("--publishes", type=int, default=100)
    parser.add_argument("--pause", type=float, default=0.05)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-publish-steps-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    redis = LocalRedis().start()
    fake = FakeOllamaProcess(7.5, 4.3, work / "fake.log")
    log = work / "steps"
    try:
        engine = make_engine(psycopg_url(pg.url()))
        migrate.upgrade(engine)
        seed_catalog(engine, 0, fake.url)
        env = {**os.environ, "DATABASE_URL": pg.url(), "REDIS_URL": redis.url,
               "OLLAMA_URL": fake.url, "STEPS_LOG": str(log)}  # fmt: skip
        worker, _ = start_worker(["-A", "bench.traced_worker", "worker"], env, work / "w.log",
                                 work / "health")  # fmt: skip
        watch = RowWatch(pg.url())
        publishes: list[tuple[float, float]] = []
        for _ in range(args.publishes + 5):  # the first five warm the connections
            [skill_id] = add_skills(engine, 1, "Published")
            time.sleep(args.pause)
            started = time.perf_counter()
            enqueue_embed_skill(skill_id, TENANT, broker_url=redis.url)
            watch.wait([skill_id])
            publishes.append((started, time.perf_counter()))
        stop(worker)
        watch.close()
        engine.dispose()
    finally:
        fake.stop()
        redis.stop()
        pg.destroy()
    marks = sorted(
        (float(at), step)
        for path in work.glob("steps.*")
        for at, step in (line.split() for line in path.read_text().splitlines())
    )
    seconds: dict[tuple[str, str], list[float]] = {}
    for started, row in publishes[5:]:
        at = {"enqueued": started, "row": row}
        for when, step in marks:
            if started <= when <= row:
                at.setdefault(step, when)
        for begin, end, _ in STEPS:
            if begin in at and end in at:
                seconds.setdefault((begin, end), []).append(at[end] - at[begin])
    table = Table(title=f"A lone publish on an idle worker, p50 of {args.publishes}")
    table.add_column("step")
    table.add_column("ms", justify="right")
    for begin, end, label in STEPS:
        values = seconds.get((begin, end))
        table.add_row(label, f"{statistics.median(values) * 1000:.2f}" if values else "-")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
