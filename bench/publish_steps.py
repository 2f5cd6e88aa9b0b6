"""Where does a lone publish's time go, step by step, across the processes it crosses?

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
import statistics
import time

from bench.harness import Results, RowWatch
from devstack import seed
from devstack.seed import TENANT
from devstack.stack import stack
from tasks import enqueue_embed_skill

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
    results = Results("publish_steps", publishes=args.publishes, pause_s=args.pause)
    with stack(prefix="bench-publish-steps-") as s:
        fake = s.fake(7.5, 4.3)
        seed.add_tenants(s.engine, ollama_url=fake.url)
        log = s.work / "steps"
        worker = s.worker(s.env(fake.url, STEPS_LOG=str(log)), app="bench.traced_worker")
        watch = RowWatch(s.database_url)
        publishes: list[tuple[float, float]] = []
        for _ in range(args.publishes + 5):  # the first five warm the connections
            [skill_id] = seed.seed_catalog(s.engine, 1, drafts=False, label="Published")
            time.sleep(args.pause)
            started = time.perf_counter()
            enqueue_embed_skill(skill_id, TENANT, broker_url=s.redis_url)
            watch.wait([skill_id])
            publishes.append((started, time.perf_counter()))
        worker.stop()
        watch.close()
        marks = sorted(
            (float(at), step)
            for path in s.work.glob("steps.*")
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
    for begin, end, label in STEPS:
        values = seconds.get((begin, end))
        if values:
            results.add(f"{label}, p50", statistics.median(values) * 1000, "ms")
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
