"""Where a lone app job's time goes, step by step, in the process that runs it.

`python -m bench.app_job_steps` runs `tasks.app_lane.embed_app_job` (what `tasks.embed_skill`
does for a job from the app) in this process against a throwaway PostgreSQL, Redis and a fake
Ollama in its own process (7.5 ms per request + 4.3 ms per input), one skill after another
with --pause between them (an idle worker, as bench.app_lane's publishes), and times each step
with a wrapper: the job's first look (its mark, its skill's deaths, its reservation, whether
other app jobs wait), load and decide, the Ollama slot, the request, the write (its re-read,
upsert and failures cleared inside it), and staging for a model switch. What the worker adds
around it (delivery, events, the pool's pipe) is the end-to-end figure of bench.app_lane minus
this total.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.app_lane import add_skills
from bench.throughput import TENANT, psycopg_url, seed_catalog
from db import migrate
from db.session import make_engine
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis

console = Console()
Timings = dict[str, list[float]]


def timed(owner: Any, name: str, label: str, timings: Timings) -> None:
    """Replace `owner.name` with a wrapper that records each call's seconds under `label`."""
    function: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timings.setdefault(label, []).append(time.perf_counter() - started)

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app_job_steps", description=__doc__)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument(
        "--pause", type=float, default=0.05, help="seconds between jobs (bench.app_lane's)"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    redis = LocalRedis().start()
    fake = FakeOllamaProcess(7.5, 4.3, work / "fake.log")
    try:
        engine = make_engine(psycopg_url(pg.url()))
        migrate.upgrade(engine)
        seed_catalog(engine, 0, fake.url)
        os.environ.update(DATABASE_URL=pg.url(), REDIS_URL=redis.url, OLLAMA_URL=fake.url)
        from db import job_statements
        from tasks import app_lane, runtime
        from tasks.embedding import EmbedRequest
        from tasks.ollama import OllamaClient
        from tasks.slots import OllamaSlots
        from worker.settings import Settings

        rt = runtime.install(Settings.load())
        timings: Timings = {}
        steps = (
            (app_lane, "_start", "first look (mark, deaths, reservation)"),
            (app_lane, "load_and_decide", "load and decide"),
            (OllamaSlots, "_acquire", "the Ollama slot"),
            (OllamaClient, "_post", "the request to Ollama (slot included)"),
            (app_lane, "write_vectors", "the write, committed"),
            (job_statements, "write_current", "  of which the re-read, upsert, clear"),
            (app_lane, "stage_edits", "staging (a switch under way?)"),
        )
        for owner, name, label in steps:
            timed(owner, name, label, timings)
        skills = add_skills(engine, args.jobs + 10, "Step")
        total = []
        for skill_id in skills:
            time.sleep(args.pause)
            started = time.perf_counter()
            # A job id, as Celery gives one: the job looks for its mark and reserves its skill.
            app_lane.embed_app_job(rt, EmbedRequest(skill_id, TENANT), str(uuid.uuid4()))
            total.append(time.perf_counter() - started)
        engine.dispose()
    finally:
        fake.stop()
        redis.stop()
        pg.destroy()
    table = Table(title=f"A lone app job, p50 of {args.jobs} (after 10 to warm up)")
    table.add_column("step")
    table.add_column("ms", justify="right")
    rows = [("the job (embed_app_job)", total), *((label, timings[label]) for *_, label in steps)]
    for label, seconds in rows:
        table.add_row(label, f"{statistics.median(seconds[10:]) * 1000:.2f}")
    table.add_row("model cost", f"{7.5 + 4.3:.2f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
