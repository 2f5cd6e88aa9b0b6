"""Does a backfill go faster with N workers + N Ollamas than with one of each, and what limits
the speed-up, from measured CPU?

`python -m bench.scaleout` starts a throwaway stack and one fake Ollama per worker (each in a
process of its own, so that the bench is not what it measures; default cost 7.5 ms per request
+ 4.3 ms per input, all-MiniLM-L6-v2 on a 2-core CPU), seeds --skills published skills in the
default tenant without pinning its site_settings.ollama_url, then for each --workers count N:

  * starts N real `celery -A worker worker` processes, worker i with OLLAMA_URL = fake i;
  * runs `celery -A worker call tasks.backfill` over a fresh run and times it from the call
    to the run's summary;
  * reports each fake's inputs, requests, most concurrent requests and share of the inputs;
  * samples CPU every 100 ms: the machine, each worker's main and pool processes, PostgreSQL,
    Redis, each fake, this process (the harness) and the `celery call`, and says what limits
    the speed-up. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from bench.harness import CORES, CpuSampler, Results, console, percentile
from bench.harness import backfill as timed_backfill
from devstack import seed
from devstack.fake_process import FakeOllamaProcess
from devstack.seed import TENANT
from devstack.stack import Stack, Worker, stack

POLL_SECONDS = 0.05  # looking for the run's end: light, so the harness is not what is measured
APP_DEFAULT_OLLAMA_URL = "http://localhost:11434"  # site_settings.ollama_url's column default


@dataclass
class Options:
    skills: int
    batch_size: int
    settings_row: str
    timeout: float
    request_s: float
    input_s: float
    ollamas: str = "own"  # own: one fake per worker; shared: one fake for them all


@dataclass
class RunTiming:
    status: str = "ok"  # ok | timeout
    seconds: float = 0.0  # from the call to the summary (or to the timeout)
    call_seconds: float = 0.0  # the `celery call` process alone
    worker_pids: dict[str, int] = field(default_factory=dict)
    run: dict[str, Any] | None = None


def reset_settings(engine: sa.Engine, row: str) -> None:
    """The default tenant's site_settings as at the start: no row, or a row at the defaults."""
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM site_settings WHERE tenant_id = :t"), {"t": TENANT})
        if row == "default":
            connection.execute(
                sa.text(
                    "INSERT INTO site_settings (id, tenant_id, semantic_similarity_enabled)"
                    " VALUES ('default', :t, true)"
                ),
                {"t": TENANT},
            )


def settings_url(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        value = connection.execute(
            sa.text("SELECT ollama_url FROM site_settings WHERE tenant_id = :t"), {"t": TENANT}
        ).scalar()
    return None if value is None else str(value)


def run_row(engine: sa.Engine) -> dict[str, Any] | None:
    """The only run (embedding_runs is truncated before each): its counts and its own window."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                "SELECT id, total, embedded, unchanged, failed, finished_at IS NOT NULL AS done,"
                " EXTRACT(EPOCH FROM (coalesce(finished_at, now()) - started_at)) AS seconds"
                " FROM embedding_runs ORDER BY started_at DESC LIMIT 1"
            )
        ).one_or_none()
    if row is None:
        return None
    return {
        "id": row.id,
        "total": int(row.total),
        "embedded": int(row.embedded),
        "unchanged": int(row.unchanged),
        "failed": int(row.failed),
        "finished": bool(row.done),
        "seconds": float(row.seconds),
    }


def run_configuration(s: Stack, workers: int, options: Options) -> dict[str, Any]:
    console.rule(f"{label(workers, options)}, {options.skills:,} skills")
    # A fresh run from the same state: no embeddings, no runs, no queued messages, the default
    # tenant's settings as seeded, and new fakes (no stats, a cold cache of their vectors).
    s.flush_redis()
    seed.clear(s.engine, catalog=False)
    reset_settings(s.engine, options.settings_row)
    count = workers if options.ollamas == "own" else 1
    fakes = [s.fake(options.request_s * 1000, options.input_s * 1000) for _ in range(count)]
    started_workers: list[Worker] = []
    try:
        for i in range(1, workers + 1):
            fake = fakes[min(i, count) - 1]
            env = s.env(fake.url, EMBED_BATCH_SIZE=str(options.batch_size))
            options_ = ["--without-mingle", "--without-gossip"]
            started_workers.append(
                s.worker(env, name=f"w{i}", hostname=f"w{i}@%h", loglevel="INFO", options=options_)
            )
        time.sleep(1.0)  # let the workers' start-up CPU settle before the baseline
        timing, sampler, call_cpu = timed_run(s, started_workers, fakes, options)
        ollamas = describe_fakes(fakes, timing.seconds, timing.run, options)
    finally:
        for worker in started_workers:
            worker.stop()
        for fake in fakes:
            fake.stop()
    run = timing.run
    current = (run["embedded"] + run["unchanged"]) if run else 0
    return {
        "workers": workers,
        "status": timing.status,
        "seconds": round(timing.seconds, 3),
        # A run that did not close has no rate: its progress is in "run".
        "skills_per_s": round(current / timing.seconds, 1) if timing.status == "ok" else 0.0,
        "progress": f"{current}/{run['total'] if run else '?'}",
        "call_seconds": round(timing.call_seconds, 3),
        "run_seconds_in_db": round(run["seconds"], 3) if run else None,
        "run": run,
        "site_settings_ollama_url": settings_url(s.engine),
        "ollamas": ollamas,
        "per_worker": {
            w.name: {
                "skills_logged_embedded": len(re.findall(r"\] Embedded: ", w.log())),
                "embed_skill_jobs": len(
                    re.findall(r"tasks\.embed_skill\[[^\]]+\] succeeded", w.log())
                ),
            }
            for w in started_workers
        },
        "cpu": describe_cpu(sampler, call_cpu, workers, timing, run),
    }


def timed_run(
    s: Stack, workers: list[Worker], fakes: list[FakeOllamaProcess], options: Options
) -> tuple[RunTiming, CpuSampler, float]:
    """Call tasks.backfill and wait for its summary, sampling CPU all along."""
    timing = RunTiming(worker_pids={w.name: w.pid for w in workers})
    components: dict[str, tuple[int, str]] = {}
    for worker in workers:
        components[f"{worker.name} main"] = (worker.pid, "root")
        components[f"{worker.name} pool"] = (worker.pid, "descendants")
    components["postgres"] = (s.postgres_pid, "tree")
    components["redis"] = (s.redis_pid, "tree")
    for i, fake in enumerate(fakes, start=1):
        components[f"fake {i}"] = (fake.pid, "tree")
    components["bench process"] = (os.getpid(), "self")
    env = {**workers[0].env, "OLLAMA_URL": APP_DEFAULT_OLLAMA_URL}  # the call embeds nothing

    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = CpuSampler(components)
    sampler.start()
    started = time.monotonic()
    try:
        done = timed_backfill(s.engine, env, poll=POLL_SECONDS, timeout=options.timeout,
                              check=False)  # fmt: skip
        timing.seconds, timing.call_seconds = done.summary_s, done.call_s
    except TimeoutError:
        timing.status = "timeout"
        timing.seconds = timing.call_seconds = time.monotonic() - started
    timing.run = run_row(s.engine)  # the run as the clock stopped (a timeout's progress)
    sampler.stop()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    call_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    return timing, sampler, call_cpu


def describe_fakes(
    fakes: list[FakeOllamaProcess],
    seconds: float,
    run: dict[str, Any] | None,
    options: Options,
) -> list[dict[str, Any]]:
    """Per fake: its stats, and how long its slot was held (by the cost model) as a share of
    the whole measure (call to summary) and of the run's own window in the database."""
    run_seconds = run["seconds"] if run else None
    stats = [fake.stats() for fake in fakes]
    total_inputs = sum(int(s["inputs"]) for s in stats) or 1
    result = []
    for i, (fake, stat) in enumerate(zip(fakes, stats, strict=True), start=1):
        inputs = int(stat["inputs"])
        busy = len(stat["batch_sizes"]) * options.request_s + inputs * options.input_s
        result.append(
            {
                "ollama": i,
                "url": fake.url,
                "inputs": inputs,
                "requests": int(stat["requests"]),
                "max_concurrent": int(stat["max_concurrent"]),
                "share": round(inputs / total_inputs, 4),
                # The time its one slot is held by the cost model (sleep in the fake).
                "model_busy_s": round(busy, 3),
                "slot_busy_pct": round(100 * busy / seconds, 1) if seconds else 0.0,
                "slot_busy_run_pct": round(100 * busy / run_seconds, 1) if run_seconds else 0.0,
            }
        )
    return result


def describe_cpu(
    sampler: CpuSampler,
    call_cpu: float,
    workers: int,
    timing: RunTiming,
    run: dict[str, Any] | None,
) -> dict[str, Any]:
    first, last = sampler.samples[0], sampler.samples[-1]
    delta = {name: max(0.0, last.cpu[name] - first.cpu[name]) for name in first.cpu}
    bench_total = delta.pop("bench process")
    components: dict[str, float] = {}
    for i in range(1, workers + 1):
        components[f"w{i} main"] = delta.pop(f"w{i} main")
        components[f"w{i} pool"] = delta.pop(f"w{i} pool")
    components["fake Ollamas"] = sum(delta.pop(name) for name in list(delta) if name[:5] == "fake ")
    components["bench harness (poll + sampler)"] = bench_total
    components["postgres"] = delta.pop("postgres")
    components["redis"] = delta.pop("redis")
    components["celery call"] = call_cpu
    others = sampler.others()
    components["other processes"] = sum(seconds for _, seconds in others)
    busy = sampler.machine_end[0] - sampler.machine_start[0]
    total = sampler.machine_end[1] - sampler.machine_start[1]
    steal = sampler.machine_end[2] - sampler.machine_start[2]
    # The machine's busy time no component accounts for: the kernel's own work, other
    # processes, and the tick-granularity error of the per-process figures (it can be < 0).
    components["unattributed"] = busy - sum(components.values())
    wall = last.t - first.t
    current = (run["embedded"] + run["unchanged"]) if run else 0
    pcts = [s.machine_pct for s in sampler.samples[1:]]
    workers_cpu = sum(v for k, v in components.items() if k.startswith("w"))
    return {
        "wall_s": round(wall, 3),
        "samples": len(sampler.samples),
        "machine_busy_s": round(busy, 3),
        "machine_pct": round(100.0 * CORES * busy / total, 1) if total else 0.0,
        "capacity_pct": 100 * CORES,
        "machine_pct_p50": round(percentile(pcts, 0.5), 1),
        "machine_pct_p90": round(percentile(pcts, 0.9), 1),
        "machine_pct_max": round(max(pcts, default=0.0), 1),
        "samples_at_90pct_of_capacity": round(
            sum(p >= 0.9 * 100 * CORES for p in pcts) / max(1, len(pcts)), 3
        ),
        "steal_pct": round(100.0 * CORES * steal / total, 1) if total else 0.0,
        "components_s": {k: round(v, 3) for k, v in components.items()},
        "components_pct": {k: round(100 * v / wall, 1) for k, v in components.items()}
        if wall
        else {},
        "per_1000_skills_s": (
            {k: round(1000 * v / current, 3) for k, v in components.items()} if current else {}
        ),
        "workers_total_s": round(workers_cpu, 3),
        "other_processes_count": len(others),
        "other_processes_top": [
            {"command": command, "cpu_s": round(seconds, 3)} for command, seconds in others[:5]
        ],
        "bench_process_pct": round(100 * bench_total / wall, 1) if wall else 0.0,
        "series": [
            {"t": round(s.t, 2), "machine_pct": round(s.machine_pct, 1)} for s in sampler.samples
        ],
    }


def limit_line(config: dict[str, Any]) -> str:
    """One line, from the measurements, on what limits this configuration."""
    cpu, ollamas = config["cpu"], config["ollamas"]
    c = cpu["components_s"]
    usage = (
        f"workers use {cpu['workers_total_s']:.1f} CPU-s, fakes"
        f" {c['fake Ollamas']:.1f}, postgres {c['postgres']:.1f},"
        f" redis {c['redis']:.1f}, celery call {c['celery call']:.1f}, harness"
        f" {c['bench harness (poll + sampler)']:.1f}, other processes {c['other processes']:.1f},"
        f" unattributed {c['unattributed']:.1f} over {cpu['wall_s']:.1f} s"
    )
    machine = (
        f"machine at {cpu['machine_pct']:.0f}% of {cpu['capacity_pct']}%"
        f" (>= 90% of it in {100 * cpu['samples_at_90pct_of_capacity']:.0f}% of samples)"
    )
    if cpu["wall_s"] and c["other processes"] >= 0.1 * cpu["capacity_pct"] / 100 * cpu["wall_s"]:
        top = cpu["other_processes_top"][0]
        machine += (
            f", SHARED: {cpu['other_processes_count']} other processes took"
            f" {c['other processes']:.1f} CPU-s (largest: {top['command'][:60]!r}"
            f" {top['cpu_s']:.1f})"
        )
    busiest = max(ollamas, key=lambda o: o["inputs"])
    slots = ", ".join(f"{o['slot_busy_run_pct']:.0f}%" for o in ollamas)
    if config["status"] != "ok":
        return f"{config['status'].upper()}: the run did not close; {machine}; {usage}"
    if len(ollamas) > 1 and busiest["share"] >= 0.9:
        pinned = config["site_settings_ollama_url"]
        return (
            f"PINNED to one Ollama: Ollama {busiest['ollama']} served {100 * busiest['share']:.0f}%"
            f" of the inputs (site_settings.ollama_url = {pinned}), the other(s) idled;"
            f" {machine}; {usage}"
        )
    if cpu["machine_pct"] >= 0.85 * cpu["capacity_pct"]:
        return f"CPU-bound: {machine}; {usage}"
    if min(o["slot_busy_run_pct"] for o in ollamas) >= 85:
        return f"Ollama-bound: slots busy {slots} of the run; {machine}; {usage}"
    if cpu["bench_process_pct"] >= 85:
        return (
            f"Harness-bound: this process (poll and sampler) at {cpu['bench_process_pct']:.0f}%"
            f" of a core; {machine}; {usage}"
        )
    return (
        f"Neither CPU nor Ollama saturated (slots busy {slots} of the run): the wait between"
        f" batches in the workers limits; {machine}; {usage}"
    )


def label(workers: int, options: Options) -> str:
    if options.ollamas == "shared":
        return f"{workers} worker(s) sharing one Ollama"
    return f"{workers} worker(s) + Ollama(s)"


def speedup_lines(configs: list[dict[str, Any]]) -> list[str]:
    base = next((c for c in configs if c["workers"] == 1 and c["status"] == "ok"), None)
    lines = []
    for c in configs:
        if c["workers"] == 1:
            continue
        if base is None or c["status"] != "ok":
            lines.append(f"Speed-up {c['workers']} vs 1 worker: n/a. Limit: {c['limit']}")
            continue
        ratio = c["skills_per_s"] / base["skills_per_s"] if base["skills_per_s"] else 0.0
        lines.append(
            f"Speed-up {c['workers']} vs 1 worker: {ratio:.2f}x"
            f" ({base['skills_per_s']:.1f} -> {c['skills_per_s']:.1f} skills/s)."
            f" Limit: {c['limit']}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__)
    parser.add_argument("--skills", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--settings-row",
        choices=["absent", "default"],
        default="absent",
        help="the default tenant's site_settings before each run: no row (the backfill makes"
        " it), or a row with ollama_url at the column default",
    )
    parser.add_argument(
        "--ollamas",
        choices=["own", "shared"],
        default="own",
        help="one fake Ollama per worker, or one that every worker shares (its one slot is"
        " then the limit, and the hand-off of the slot between workers is what is measured)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work dir and logs")
    args = parser.parse_args(argv)
    options = Options(
        skills=args.skills,
        batch_size=args.batch_size,
        settings_row=args.settings_row,
        timeout=args.timeout,
        request_s=args.request_ms / 1000,
        input_s=args.input_ms / 1000,
        ollamas=args.ollamas,
    )
    results = Results("scaleout" if args.ollamas == "own" else "scaleout_shared",
                      skills=args.skills, workers=args.workers,
                      cost_model_ms=[args.request_ms, args.input_ms], batch_size=args.batch_size,
                      settings_row=args.settings_row, timeout_s=args.timeout,
                      ollamas=args.ollamas)  # fmt: skip
    configs: list[dict[str, Any]] = []
    with stack(prefix="bench-scaleout-", keep=args.keep_logs) as s:
        seed.add_tenants(s.engine, settings=False)
        seed.seed_catalog(s.engine, args.skills, drafts=False)
        seed.analyze(s.engine)
        for workers in args.workers:
            config = run_configuration(s, workers, options)
            config["limit"] = limit_line(config)
            console.print(
                f"{config['status']}: {config['skills_per_s']:.1f} skills/s; {config['limit']}"
            )
            configs.append(config)
    base = next((c for c in configs if c["workers"] == 1 and c["status"] == "ok"), None)
    for c in configs:
        n = label(c["workers"], options)
        results.add(f"{n}: backfill, call -> summary", c["skills_per_s"], "skills/s")
        if base and c is not base and c["status"] == "ok" and base["skills_per_s"]:
            results.add(f"{n}: speed-up over one", c["skills_per_s"] / base["skills_per_s"], "x")
        results.add(f"{n}: call -> summary", c["seconds"], "s")
        results.add(f"{n}: the `celery call` process", c["call_seconds"], "s")
        results.add(f"{n}: the run's own window in the database", c["run_seconds_in_db"] or 0,
                    "s")  # fmt: skip
        for o in c["ollamas"]:
            fake = f"{n}: Ollama {o['ollama']}"
            results.add(f"{fake}, inputs", o["inputs"], "inputs")
            results.add(f"{fake}, requests", o["requests"], "requests")
            results.add(f"{fake}, most requests at once", o["max_concurrent"], "requests")
            results.add(f"{fake}, share of the inputs", 100 * o["share"], "%")
            results.add(f"{fake}, slot busy over the whole measure", o["slot_busy_pct"], "%")
            results.add(f"{fake}, slot busy over the run", o["slot_busy_run_pct"], "%")
        for name, w in c["per_worker"].items():
            results.add(f"{n}: {name} logged skills embedded", w["skills_logged_embedded"],
                        "skills")  # fmt: skip
            results.add(f"{n}: {name} ran embed_skill jobs", w["embed_skill_jobs"], "jobs")
        cpu = c["cpu"]
        for component, seconds in cpu["components_s"].items():
            per = cpu["per_1000_skills_s"].get(component)
            results.add(f"{n}: CPU, {component}", seconds, "s")
            if per is not None:
                results.add(f"{n}: CPU per 1,000 skills, {component}", per, "s")
        results.add(f"{n}: CPU, workers (main + pool)", cpu["workers_total_s"], "s")
        results.add(f"{n}: machine busy", cpu["machine_busy_s"], "CPU-s")
        results.add(f"{n}: machine CPU, mean", cpu["machine_pct"], "%",
                    limit=("capacity", cpu["capacity_pct"]))  # fmt: skip
        results.add(f"{n}: machine CPU, p90", cpu["machine_pct_p90"], "%")
        results.add(f"{n}: machine CPU, max", cpu["machine_pct_max"], "%")
        results.add(f"{n}: steal", cpu["steal_pct"], "%")
    results.details["configs"] = configs
    results.details["speedup_lines"] = speedup_lines(configs)
    for c in configs:
        url = c["site_settings_ollama_url"]
        pinned = next((o["ollama"] for o in c["ollamas"] if o["url"] == url), None)
        console.print(f"{c['workers']} worker(s): site_settings.ollama_url after the run = {url}"
                      + (f" (Ollama {pinned})" if pinned else ""))  # fmt: skip
    for line in [*(f"{c['workers']} worker(s): {c['limit']}" for c in configs),
                 *results.details["speedup_lines"]]:  # fmt: skip
        console.print(f"[bold]{line}")
    console.print(
        "Note: the fakes sleep through the model's time; a real CPU Ollama would also spend"
        " roughly its slot-busy time as CPU on these cores (model_busy_s in the JSON)."
    )
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
