"""Does the worker keep a single-slot Ollama busy, and how close does a backfill come to the
limit a user can reach from the command?

`python -m bench.model_busy` starts a throwaway stack, a worker and a fake Ollama in a process
of its own (the CPU model's cost, 7.5 ms + 4.3 ms per input, one slot), then:

  (a) a bare Celery app's `celery -A bench.bare_app call bare.noop`, five times: the floor of
      any command that queues a job;
  (b) for each size (150 and 1,000 skills): `celery -A worker call tasks.backfill` from the
      moment the command starts to the run's summary (after its last row), beside its limit
      from the same run: the bare `celery call` plus the model's own time for the requests the
      run made, as the fake counted it. The fake also counts each idle gap between one answer
      and the next request's start: the model's busy share of the steady phase (its first and
      last two requests left out) is its time over its time plus those gaps. The CPU of the
      worker (main and pool), PostgreSQL, Redis and the fake over the run stands beside it, with
      the machine's: on two cores, a full machine is the other limit;
  (c) the worker's cold start, several times: `celery -A worker worker` to consuming (its
      heartbeat file), and, with a backfill called the moment the worker is spawned over a
      catalog of 150 stale skills, the spawn to the first row written.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time

import sqlalchemy as sa

from bench.harness import CpuSampler, Results, console, worker_parts
from bench.harness import backfill as timed_backfill
from devstack import seed
from devstack.fake_process import FakeOllamaProcess
from devstack.stack import CELERY, ROOT, Stack, Worker, stack

# The first requests wait on the fan-out and the last on the close: not the steady phase.
EDGE_REQUESTS = 2


def bare_calls(s: Stack, times: int) -> list[float]:
    """Seconds of `celery -A bench.bare_app call bare.noop`, a cold process each time."""
    env = s.env("http://127.0.0.1:9")
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        subprocess.run([*CELERY, "-A", "bench.bare_app", "call", "bare.noop"], env=env, cwd=ROOT,
                       capture_output=True, check=True)  # fmt: skip
        seconds.append(time.perf_counter() - started)
    s.flush_redis()  # no worker consumes bare.noop here
    return seconds


def steady_busy(gaps: list[float], model_s: float, requests: int) -> tuple[float, float]:
    """The model's busy share over the steady phase, and its mean idle gap there (ms)."""
    inner = gaps[EDGE_REQUESTS:-EDGE_REQUESTS] if len(gaps) > 2 * EDGE_REQUESTS + 1 else gaps
    # Requests of one run cost alike: the steady phase's model time is its share of requests.
    busy = model_s * (len(inner) + 1) / max(1, requests)
    idle = sum(inner)
    return busy / (busy + idle) if busy + idle else 0.0, idle / max(1, len(inner)) * 1000


def first_row_from_spawn(s: Stack, env: dict[str, str], size: int) -> tuple[float, float]:
    """(spawn -> consuming, spawn -> first row) with a backfill called at the spawn."""
    seed.clear(s.engine, catalog=False)
    box: dict[str, Worker] = {}
    spawned = time.perf_counter()
    # Stack.worker returns once the worker consumes; the call must not wait for that.
    starter = threading.Thread(target=lambda: box.update(w=s.worker(env, name="cold")))
    starter.start()
    called = time.perf_counter()
    run = timed_backfill(s.engine, env, first_row=True, poll=0.01)
    starter.join()
    worker = box["w"]
    worker.stop()
    if run.first_row_s is None or run.total != size:
        raise RuntimeError(f"the cold start's backfill wrote no row or not {size} skills: {run}")
    return worker.started_in, called - spawned + run.first_row_s


def measure(s: Stack, env: dict[str, str], fake: FakeOllamaProcess, worker: Worker, size: int,
            results: Results, bare_s: float) -> None:  # fmt: skip
    label = f"{size:,} skills"
    console.print(f"(b) {label}")
    seed.clear(s.engine)
    seed.add_tenants(s.engine, ollama_url=fake.url)
    seed.seed_catalog(s.engine, size)
    fake.reset()
    cpu = CpuSampler({**worker_parts(worker.pid), "postgres": (s.postgres_pid, "tree"),
                      "redis": (s.redis_pid, "root"), "fake": (fake.pid, "root")})  # fmt: skip
    run = timed_backfill(s.engine, env, poll=0.01)
    cpu.stop()
    stats = fake.stats()
    model_s, gaps, requests = stats["model_seconds"], stats["idle_gaps"], stats["requests"]
    limit_s = bare_s + model_s
    busy, gap_ms = steady_busy(gaps, model_s, requests)
    wall = run.summary_s
    results.add(f"{label}: command -> summary", wall, "s",
                limit=("bare `celery call` + the model's own time", limit_s))  # fmt: skip
    results.add(f"{label}: share of the limit reached", limit_s / wall, "x", target=">= 0.9")
    results.add(f"{label}: ... the model's own time ({requests} requests)", model_s, "s")
    results.add(f"{label}: model busy, steady phase", busy * 100, "%", target=">= 95 %")
    results.add(f"{label}: mean idle gap between requests, steady phase", gap_ms, "ms")
    results.add(f"{label}: longest idle gap", max(gaps, default=0.0) * 1000, "ms")
    results.add(f"{label}: the fake's latest answer (its own delay, not idle time)",
                max(stats["late_answers"], default=0.0) * 1000, "ms")  # fmt: skip
    results.add(f"{label}: rate from the command", size / wall, "skills/s")
    used = cpu.used()
    busy_cores = (cpu.machine_end[0] - cpu.machine_start[0]) / max(
        1e-9, cpu.machine_end[1] - cpu.machine_start[1]
    )
    for name, seconds in used.items():
        results.add(f"{label}: CPU of {name}", seconds / wall * 100, "% of a core")
    results.add(f"{label}: CPU of the machine", busy_cores * 100, "% of its cores")
    results.details[label] = {"idle_gaps_ms": [round(g * 1000, 3) for g in gaps],
                              "cpu_s": used}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_busy", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 1000])
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    parser.add_argument("--cold-starts", type=int, default=3)
    args = parser.parse_args(argv)
    results = Results("model_busy", sizes=args.sizes, cold_starts=args.cold_starts,
                      cost_model_ms=[args.request_ms, args.input_ms])  # fmt: skip
    with stack(prefix="bench-busy-") as s:
        fake = s.fake(args.request_ms, args.input_ms)
        env = s.env(fake.url)
        console.print("(a) a bare Celery app's `celery call`, 5 times")
        bare = bare_calls(s, 5)
        bare_s = results.add("bare `celery -A bench.bare_app call bare.noop`, median",
                             statistics.median(bare), "s")  # fmt: skip
        worker = s.worker(env)
        seed.add_tenants(s.engine, ollama_url=fake.url)
        seed.seed_catalog(s.engine, 10)
        timed_backfill(s.engine, env)  # warm: the pool process has loaded the model's client
        for size in args.sizes:
            measure(s, env, fake, worker, size, results, bare_s)
        worker.stop()
        console.print(f"(c) the worker's cold start, {args.cold_starts} times")
        seed.clear(s.engine)
        seed.add_tenants(s.engine, ollama_url=fake.url)
        seed.seed_catalog(s.engine, 150)
        ready, first = [], []
        for _ in range(args.cold_starts):
            started_in, first_row = first_row_from_spawn(s, env, 150)
            ready.append(started_in)
            first.append(first_row)
        results.add("worker cold start, spawn -> consuming, median", statistics.median(ready),
                    "s", target="<= 1.5 s")  # fmt: skip
        results.add("backfill called at the spawn: spawn -> first row, median",
                    statistics.median(first), "s", target="<= 2.0 s")  # fmt: skip
        results.details["cold_starts"] = {"ready_s": ready, "first_row_s": first}
        with s.engine.connect() as connection:
            results.details["rows"] = connection.execute(
                sa.text("SELECT count(*) FROM skill_embeddings")
            ).scalar_one()
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
