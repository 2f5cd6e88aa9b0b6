"""What a user times: from the command typed to the last row written, beside the limits.

`python -m bench.from_command` starts a throwaway PostgreSQL, Redis, a worker and fake Ollamas
(each in its own process, so the bench's own threads are not what is measured), then, in one run:

  (a) a cold `celery -A worker call tasks.backfill` process, and a worker's cold start
      (`celery -A worker worker` to consuming, from its heartbeat file);
  (b) for each size (150 and 1,000 skills at the CPU model's cost, 3,000 at zero cost): the
      seed plan's loop, then `celery -A worker call tasks.backfill` from the moment the command
      starts to the run's last row;
  (c) the worker's CPU per skill (main and pool process) over the zero-cost run, jobs drained,
      beside a bare Celery job's (bench.bare_app, same options) consumed and sent;
  (d) PostgreSQL's write ceiling: our upsert from one connection, 32 rows a statement, with the
      app's HNSW index, nothing else running.

Results print as a table and go to bench/results/from_command.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis as redis_lib
import sqlalchemy as sa
from celery import Celery
from rich.console import Console
from rich.table import Table

from bench.job_overhead import cpu_seconds, write_ceiling
from bench.throughput import RESULTS, clear_embeddings, psycopg_url, seed_catalog, sequential_loop
from db import migrate
from db.session import make_engine
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.queues import BULK, INTERACTIVE

console = Console()
CELERY = [sys.executable, "-m", "celery"]


def start_worker(
    args: list[str], env: dict[str, str], log: Path, health: Path
) -> tuple[subprocess.Popen[bytes], float]:
    """Start a worker; returns it and the seconds from the command to consuming."""
    started = time.perf_counter()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*CELERY, *args, "--loglevel=WARNING"], env={**env, "HEALTH_DIR": str(health)},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    while not any(health.glob("*.heartbeat")):
        if process.poll() is not None or time.perf_counter() - started > 120:
            raise RuntimeError(f"the worker did not start: {log.read_text()[-2000:]}")
        time.sleep(0.005)
    return process, time.perf_counter() - started


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        process.wait(30)


def backfill_from_command(
    engine: sa.Engine, env: dict[str, str], broker: redis_lib.Redis
) -> dict[str, float]:
    """`celery -A worker call tasks.backfill`: seconds to the call's exit, to the run's last
    row (its summary), and to the last of its jobs confirmed."""
    started = time.perf_counter()
    call = subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    called = time.perf_counter() - started
    run_id = call.stdout.strip()
    with engine.connect() as connection:
        while not connection.execute(
            sa.text("SELECT finished_at IS NOT NULL FROM embedding_runs WHERE id = :id"),
            {"id": run_id},
        ).scalar():
            connection.commit()
            time.sleep(0.003)
        last_row = time.perf_counter() - started
        failed = connection.execute(
            sa.text("SELECT failed FROM embedding_runs WHERE id = :id"), {"id": run_id}
        ).scalar()
    if failed:
        raise RuntimeError(f"backfill {run_id}: {failed} failures")
    while broker.llen(BULK) or broker.llen(INTERACTIVE) or broker.hlen("unacked"):
        time.sleep(0.003)
    return {"call_s": called, "last_row_s": last_row, "drained_s": time.perf_counter() - started}


def pool_and_main(worker: subprocess.Popen[bytes]) -> dict[str, list[psutil.Process]]:
    main = psutil.Process(worker.pid)
    return {"main": [main], "pool": main.children()}


def bare_job_cost(env: dict[str, str], redis_url: str, jobs: int, work: Path) -> dict[str, float]:
    """CPU per no-op job of bench.bare_app (consumed: main + pool) and per message sent."""
    app = Celery("bench", broker=redis_url, set_as_current=False)
    app.conf.task_send_sent_event = True
    before = time.process_time()
    with app.producer_or_acquire() as producer:
        for i in range(jobs):
            app.send_task("bare.noop", kwargs={"skill_id": str(i), "tenant_id": "t", "run_id": "r"},
                          queue="bare", producer=producer)  # fmt: skip
    sent_ms = (time.process_time() - before) / jobs * 1000
    app.close()
    broker = redis_lib.Redis.from_url(redis_url)
    log = (work / "bare.log").open("wb")
    worker = subprocess.Popen([*CELERY, "-A", "bench.bare_app", "worker", "--loglevel=WARNING"],
                              env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        while broker.llen("bare") == jobs:  # its start is not a job's cost: count from the first
            if worker.poll() is not None:
                raise RuntimeError("the bare worker exited")
            time.sleep(0.001)
        parts = pool_and_main(worker)
        cpu = {name: cpu_seconds(procs) for name, procs in parts.items()}
        while broker.llen("bare") or broker.hlen("unacked"):
            time.sleep(0.003)
        after = {name: cpu_seconds(procs) for name, procs in parts.items()}
    finally:
        stop(worker)
        log.close()
        broker.close()
    consumed = {f"{n}_ms": (after[n] - cpu[n]) / jobs * 1000 for n in parts}
    return {**consumed, "sent_ms": sent_ms, "total_ms": sum(consumed.values()) + sent_ms}


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
    work = Path(tempfile.mkdtemp(prefix="bench-command-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    redis = LocalRedis().start()
    fakes = {
        "cpu": FakeOllamaProcess(args.request_ms, args.input_ms, work / "fake-cpu.log"),
        "zero": FakeOllamaProcess(0.0, 0.0, work / "fake-zero.log"),
    }
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                                "cost_model_ms": [args.request_ms, args.input_ms]}  # fmt: skip
    worker: subprocess.Popen[bytes] | None = None
    broker = redis_lib.Redis.from_url(redis.url)
    try:
        engine = make_engine(psycopg_url(pg.url()))
        migrate.upgrade(engine)
        env = {**os.environ, "DATABASE_URL": pg.url(), "REDIS_URL": redis.url,
               "OLLAMA_URL": fakes["cpu"].url}  # fmt: skip
        worker, results["worker_cold_start_s"] = start_worker(
            ["-A", "worker", "worker"], env, work / "worker.log", work / "health"
        )
        seed_catalog(engine, 10, fakes["cpu"].url)
        console.print("(a) cold `celery -A worker call tasks.backfill`, 5 times")
        calls = cold_calls(env, 5)
        results["cold_call_s"] = {"median": statistics.median(calls), "min": min(calls)}
        for phase, size, fake in (("small", small, "cpu"), ("cpu_model", cpu_size, "cpu"),
                                  ("zero_cost", zero_size, "zero")):  # fmt: skip
            console.print(f"(b) {phase}: {size} skills")
            seed_catalog(engine, size, fakes[fake].url)
            count, seq_seconds = sequential_loop(pg.url(), fakes[fake].url)
            clear_embeddings(engine)
            parts = pool_and_main(worker)
            cpu = {name: cpu_seconds(procs) for name, procs in parts.items()}
            timing = backfill_from_command(engine, env, broker)
            after = {name: cpu_seconds(procs) for name, procs in parts.items()}
            results[phase] = {
                "skills": count,
                "seed_loop_s": seq_seconds,
                **timing,
                "speedup": seq_seconds / timing["last_row_s"],
                "cpu_ms_per_skill": {n: (after[n] - cpu[n]) / count * 1000 for n in parts},
            }
        batch_ms = args.request_ms + 32 * args.input_ms
        results["model_limit_per_s"] = 32 / batch_ms * 1000
        stop(worker)
        console.print(f"(c) a bare Celery job, {args.bare_jobs} of them")
        results["bare_job"] = bare_job_cost(env, redis.url, args.bare_jobs, work)
        console.print("(d) PostgreSQL's write ceiling from one connection")
        ceiling = write_ceiling(engine, zero_size)
        results["pg_write_rows_per_s"] = ceiling["rows/s with the HNSW index"]
        engine.dispose()
    finally:
        if worker is not None:
            stop(worker)
        broker.close()
        for fake_process in fakes.values():
            fake_process.stop()
        redis.stop()
        pg.destroy()
    report(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "from_command.json").write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict[str, Any]) -> None:
    table = Table(title="From the command to the last row", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    calls = r["cold_call_s"]
    table.add_row("cold `celery -A worker call tasks.backfill`",
                  f"{calls['median']:.3f} s (min {calls['min']:.3f})", "<= 0.6 s")  # fmt: skip
    table.add_row("worker cold start, command to consuming", f"{r['worker_cold_start_s']:.2f} s",
                  "")  # fmt: skip
    targets = {"small": ">= 1.7x", "cpu_model": ">= 3.4x", "zero_cost": ">= 2.0x"}
    for phase in ("small", "cpu_model", "zero_cost"):
        x = r[phase]
        rate = x["skills"] / x["last_row_s"]
        table.add_row(f"[bold]{x['skills']} skills ({phase.replace('_', ' ')})", "", "")
        table.add_row("  seed plan's loop", f"{x['seed_loop_s']:.2f} s", "")
        table.add_row("  command -> last row", f"{x['last_row_s']:.2f} s ({rate:.0f}/s)", "")
        table.add_row("  ... of which the call process", f"{x['call_s']:.2f} s", "")
        table.add_row("  speed-up over the seed loop", f"{x['speedup']:.2f}x", targets[phase])
        cpu = x["cpu_ms_per_skill"]
        table.add_row("  worker CPU per skill, main + pool",
                      f"{cpu['main']:.2f} + {cpu['pool']:.2f} ms", "")  # fmt: skip
    table.add_row("model limit (32 a batch)", f"{r['model_limit_per_s']:.0f} skills/s", "")
    bare = r["bare_job"]
    table.add_row("bare Celery job: consumed main + pool, sent",
                  f"{bare['main_ms']:.2f} + {bare['pool_ms']:.2f} + {bare['sent_ms']:.2f} ms",
                  "")  # fmt: skip
    zero = r["zero_cost"]
    table.add_row("worker CPU per skill at zero cost",
                  f"{sum(zero['cpu_ms_per_skill'].values()):.2f} ms", "<= 3.5 ms")  # fmt: skip
    table.add_row("PostgreSQL write ceiling, one connection",
                  f"{r['pg_write_rows_per_s']:.0f} rows/s", "")  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main())
