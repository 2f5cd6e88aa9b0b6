"""What does a user time, from the command typed to the last row written, beside the limits
measured in the same run?

`python -m bench.from_command` starts a throwaway stack, a worker and two fake Ollamas in
processes of their own (the CPU model's cost, 7.5 ms + 4.3 ms per input, and zero cost), then:

  (a) a cold `celery -A worker call tasks.backfill` process, five times, and the worker's cold
      start (`celery -A worker worker` to consuming, from its heartbeat file);
  (b) for each size (150 and 1,000 skills at the CPU model's cost, 3,000 at zero cost): the
      seed plan's loop, then `celery -A worker call tasks.backfill` from the moment the command
      starts to the run's last row, with the worker's CPU per skill (main and pool process,
      jobs drained);
  (c) a bare Celery job's CPU (bench.bare_app: one no-op task, the worker's own options),
      consumed and sent;
  (d) PostgreSQL's write ceiling: our upsert from one connection, 32 rows a statement, with the
      app's HNSW index, nothing else running.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import redis as redis_lib
from celery import Celery

from bench.harness import (
    CpuSampler,
    Results,
    console,
    model_limit,
    sequential_loop,
    worker_parts,
    write_ceiling,
)
from bench.harness import backfill as timed_backfill
from devstack import seed
from devstack.stack import CELERY, Stack, stack


def bare_job_cost(s: Stack, env: dict[str, str], jobs: int) -> dict[str, float]:
    """CPU per no-op job of bench.bare_app (consumed: main + pool) and per message sent."""
    app = Celery("bench", broker=s.redis_url, set_as_current=False)
    app.conf.task_send_sent_event = True
    before = time.process_time()
    with app.producer_or_acquire() as producer:
        for i in range(jobs):
            app.send_task("bare.noop", kwargs={"skill_id": str(i), "tenant_id": "t", "run_id": "r"},
                          queue="bare", producer=producer)  # fmt: skip
    sent_ms = (time.process_time() - before) / jobs * 1000
    app.close()
    broker = redis_lib.Redis.from_url(s.redis_url)
    worker = s.worker(env, app="bench.bare_app", name="bare")
    # Its start is not a job's cost: count from the moment it consumes, the jobs still queued.
    cpu = CpuSampler(worker_parts(worker.pid))
    left = int(broker.llen("bare"))
    while broker.llen("bare") or broker.hlen("unacked"):
        time.sleep(0.003)
    used = cpu.stop().used()
    worker.stop()
    broker.close()
    consumed = {f"{n}_ms": used[n] / max(1, left) * 1000 for n in used}
    return {**consumed, "sent_ms": sent_ms}


def cold_calls(env: dict[str, str], times: int) -> list[float]:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env,
                       capture_output=True, check=True)  # fmt: skip
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.from_command", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs=3, default=[150, 1000, 3000],
                        metavar=("SMALL", "CPU", "ZERO"))  # fmt: skip
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    parser.add_argument("--bare-jobs", type=int, default=3000)
    args = parser.parse_args(argv)
    small, cpu_size, zero_size = args.sizes
    results = Results("from_command", sizes=args.sizes, bare_jobs=args.bare_jobs,
                      cost_model_ms=[args.request_ms, args.input_ms])  # fmt: skip
    with stack(prefix="bench-command-") as s:
        fakes = {"cpu": s.fake(args.request_ms, args.input_ms), "zero": s.fake()}
        env = s.env(fakes["cpu"].url)
        worker = s.worker(env)
        results.add("worker cold start, command to consuming", worker.started_in, "s")
        seed.add_tenants(s.engine, ollama_url=fakes["cpu"].url)
        seed.seed_catalog(s.engine, 10)
        console.print("(a) cold `celery -A worker call tasks.backfill`, 5 times")
        calls = cold_calls(env, 5)
        results.add("cold `celery -A worker call tasks.backfill`, median",
                    statistics.median(calls), "s", target="<= 0.6 s")  # fmt: skip
        results.add("cold `celery -A worker call tasks.backfill`, min", min(calls), "s")
        limit = model_limit(args.request_ms, args.input_ms) or 0.0
        targets = {"small": ">= 1.7x", "cpu_model": ">= 3.4x", "zero_cost": ">= 2.0x"}
        for phase, size, fake in (("small", small, "cpu"), ("cpu_model", cpu_size, "cpu"),
                                  ("zero_cost", zero_size, "zero")):  # fmt: skip
            label = f"{size:,} skills ({phase.replace('_', ' ')})"
            console.print(f"(b) {label}")
            seed.clear(s.engine)
            seed.add_tenants(s.engine, ollama_url=fakes[fake].url)
            seed.seed_catalog(s.engine, size)
            count, loop_s = sequential_loop(s.engine, fakes[fake].url)
            seed.clear(s.engine, catalog=False)
            cpu = CpuSampler(worker_parts(worker.pid))
            run = timed_backfill(s.engine, env, drain=True)
            used = cpu.stop().used()
            results.add(f"{label}: seed plan's loop", loop_s, "s")
            results.add(f"{label}: command -> last row", run.summary_s, "s")
            results.add(
                f"{label}: command -> last row, rate", count / run.summary_s, "skills/s",
                limit=("the model's limit", limit) if fake == "cpu" else None,
            )  # fmt: skip
            results.add(f"{label}: ... of which the call process", run.call_s, "s")
            results.add(f"{label}: ... to the last job confirmed", run.drained_s or 0.0, "s")
            results.add(f"{label}: speed-up over the seed loop", loop_s / run.summary_s, "x",
                        target=targets[phase])  # fmt: skip
            results.add(f"{label}: worker CPU per skill, main", used["main"] / count * 1000, "ms")
            results.add(f"{label}: worker CPU per skill, pool", used["pool"] / count * 1000, "ms")
            if fake == "zero":
                results.add("worker CPU per skill at zero cost, main + pool",
                            (used["main"] + used["pool"]) / count * 1000, "ms",
                            target="<= 3.5 ms")  # fmt: skip
        results.add("the model's limit (32 a batch)", limit, "skills/s")
        worker.stop()
        console.print(f"(c) a bare Celery job, {args.bare_jobs} of them")
        bare = bare_job_cost(s, env, args.bare_jobs)
        results.add("bare Celery job consumed, main", bare["main_ms"], "ms")
        results.add("bare Celery job consumed, pool", bare["pool_ms"], "ms")
        results.add("bare Celery job sent", bare["sent_ms"], "ms")
        results.add("bare Celery job, total", sum(bare.values()), "ms")
        console.print("(d) PostgreSQL's write ceiling from one connection")
        ceiling = write_ceiling(s.engine, zero_size)
        results.add("PostgreSQL's write ceiling, one connection, HNSW index",
                    ceiling["with_index_rows_per_s"], "rows/s")  # fmt: skip
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
