"""Where does a lone app job's time go, step by step, in the process that runs it?

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
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.harness import Results
from devstack import seed
from devstack.seed import TENANT
from devstack.stack import stack

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
    results = Results("app_job_steps", jobs=args.jobs, pause_s=args.pause)
    with stack(prefix="bench-steps-") as s:
        fake = s.fake(7.5, 4.3)
        seed.add_tenants(s.engine, ollama_url=fake.url)
        os.environ.update(s.env(fake.url))
        from db import catalog
        from tasks import app_lane, runtime, switch
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
            (catalog, "write_current", "  of which the re-read, upsert, clear"),
            (switch.Switching, "now", "a switch under way? (after the write)"),
        )
        for owner, name, label in steps:
            timed(owner, name, label, timings)
        skills = seed.seed_catalog(s.engine, args.jobs + 10, drafts=False, label="Step")
        total = []
        for skill_id in skills:
            time.sleep(args.pause)
            started = time.perf_counter()
            # A job id, as Celery gives one: the job looks for its mark and reserves its skill.
            app_lane.embed_app_job(rt, EmbedRequest(skill_id, TENANT), str(uuid.uuid4()))
            total.append(time.perf_counter() - started)
    rows = [("the job (embed_app_job)", total), *((label, timings[label]) for *_, label in steps)]
    for label, seconds in rows:
        results.add(f"{label.strip()}, p50", statistics.median(seconds[10:]) * 1000, "ms")
    results.add("the model's cost", 7.5 + 4.3, "ms")
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
