"""Backfill scale-out: 1 worker + 1 Ollama against N workers + N Ollamas, with measured CPU.

`python -m bench.scaleout` starts a throwaway PostgreSQL, Redis and one fake Ollama per worker
(each in a process of its own, so that the bench is not what it measures; default cost 7.5 ms
per request + 4.3 ms per input, all-MiniLM-L6-v2 on a 2-core CPU), seeds --skills published
skills in the default tenant without pinning its site_settings.ollama_url, then for each
--workers count N:

  * starts N real `celery -A worker worker` processes, worker i with OLLAMA_URL = fake i;
  * runs `celery -A worker call tasks.backfill` over a fresh run and times it from the call
    to the run's summary line (`Done. Embedded X/Y skills. Z failures.`);
  * reports each fake's inputs, requests, most concurrent requests and share of the inputs;
  * samples CPU every 100 ms: the machine, each worker's main and pool processes, PostgreSQL,
    Redis, each fake, this process (the harness) and the `celery call`, and says what limits
    the speed-up.

Results print as tables and go to bench/results/scaleout.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bench.fanout import SEED_SKILLS_SQL
from bench.throughput import RESULTS, TENANT, clear_embeddings, psycopg_url
from db import migrate
from db.session import make_engine
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SECONDS = 0.1  # CPU samples
POLL_SECONDS = 0.05  # looking for the summary line in the workers' logs
DB_POLL_SECONDS = 0.5  # looking for embedding_runs.finished_at
SUMMARY = re.compile(rb"Done\. Embedded (\d+)/(\d+) skills\. (\d+) failures\.")
APP_DEFAULT_OLLAMA_URL = "http://localhost:11434"  # site_settings.ollama_url's column default
CORES = os.cpu_count() or 1
console = Console(width=max(Console().width, 150))


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker", *args]


# ------------------------------------------------------------------------------------------
# Workers


class Worker:
    """One `celery -A worker worker` in its own process group, its output in a log file."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Worker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                celery(
                    "worker", "--loglevel=INFO", f"--hostname={self.name}@%h",
                    "--without-mingle", "--without-gossip",
                ),
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    def log(self) -> bytes:
        return self.log_path.read_bytes() if self.log_path.exists() else b""

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while b"ready." not in self.log():
            if self.process is not None and self.process.poll() is not None:
                tail = self.log()[-3000:].decode(errors="replace")
                raise RuntimeError(
                    f"worker {self.name} exited ({self.process.returncode}):\n{tail}"
                )
            if time.monotonic() > deadline:
                tail = self.log()[-3000:].decode(errors="replace")
                raise RuntimeError(f"worker {self.name} not ready in {timeout:.0f} s:\n{tail}")
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (warm shutdown), SIGKILL it after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class LogTail:
    """Reads only what the workers' logs gained since the last look, for the summary line."""

    def __init__(self, paths: list[Path]) -> None:
        self.offsets = {path: path.stat().st_size if path.exists() else 0 for path in paths}
        self.partial = dict.fromkeys(paths, b"")

    def summary(self) -> tuple[int, int, int] | None:
        for path, offset in self.offsets.items():
            with path.open("rb") as log:
                log.seek(offset)
                data = log.read()
            self.offsets[path] = offset + len(data)
            text = self.partial[path] + data
            lines, _, self.partial[path] = text.rpartition(b"\n")
            match = SUMMARY.search(lines)
            if match is not None:
                return int(match[1]), int(match[2]), int(match[3])
        return None


# ------------------------------------------------------------------------------------------
# CPU


@dataclass(frozen=True)
class Proc:
    ppid: int
    own: float  # user + system of the process itself
    reaped: float  # user + system of its children it has waited for


def snapshot() -> dict[tuple[int, float], Proc]:
    """Every process on the machine, keyed by (pid, create time): one pass over /proc."""
    procs: dict[tuple[int, float], Proc] = {}
    for process in psutil.process_iter(["ppid", "create_time", "cpu_times"]):
        info = process.info
        times = info["cpu_times"]
        if times is None or info["ppid"] is None:
            continue  # gone, or not readable
        procs[(process.pid, float(info["create_time"] or 0.0))] = Proc(
            int(info["ppid"]),
            float(times.user + times.system),
            float(times.children_user + times.children_system),
        )
    return procs


def descendants(procs: dict[tuple[int, float], Proc], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for (pid, _), proc in procs.items():
        children.setdefault(proc.ppid, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def machine_busy() -> tuple[float, float, float]:
    """(busy, total, steal) CPU seconds summed over all cores since boot."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq  # guest time is inside user already
    total = busy + t.idle + t.iowait + t.steal
    return float(busy), float(total), float(t.steal)


@dataclass
class Sample:
    t: float  # seconds since the sampler's first sample
    machine_pct: float  # since the previous sample; 100 = one core
    cpu: dict[str, float]  # cumulative CPU seconds per component


class CpuSampler(threading.Thread):
    """Every SAMPLE_SECONDS: the machine's CPU and each component's cumulative CPU seconds.

    `components` maps a name to (pid, part): "root" is the process itself plus the children
    it has reaped, "descendants" its live descendants (each with what it reaped), "tree" both,
    "self" this process's own threads only (its children are components of their own). A
    component whose processes are gone keeps its last value. Every other process on the
    machine is tracked too, by its own user + system time, so a machine shared with other work
    shows as such rather than as our load."""

    def __init__(self, components: dict[str, tuple[int, str]]) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.components = components
        self.samples: list[Sample] = []
        self._halt = threading.Event()
        self._last: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._wall_t0 = time.time()
        self._others_first: dict[tuple[int, float], float] = {}
        self._others_last: dict[tuple[int, float], float] = {}
        self._others_names: dict[tuple[int, float], str] = {}
        self._machine = machine_busy()
        self.machine_start = self.machine_end = self._machine
        self.sample()

    def sample(self) -> None:
        procs = snapshot()
        by_pid = {pid: proc for (pid, _), proc in procs.items()}
        ours = {os.getpid(), *descendants(procs, os.getpid())}
        cpu: dict[str, float] = {}
        for name, (root, part) in self.components.items():
            below = descendants(procs, root) if part in ("descendants", "tree") else set()
            ours |= below | {root}
            if root not in by_pid:
                cpu[name] = self._last.get(name, 0.0)
                continue
            value = by_pid[root].own if part == "self" else 0.0
            if part in ("root", "tree"):
                value += by_pid[root].own + by_pid[root].reaped
            value += sum(by_pid[pid].own + by_pid[pid].reaped for pid in below if pid in by_pid)
            cpu[name] = value
        self._last = cpu
        for key, proc in procs.items():
            if key[0] in ours:
                continue
            if key not in self._others_first:
                # Born after the first sample: all of its time is the run's.
                self._others_first[key] = 0.0 if key[1] > self._wall_t0 else proc.own
                with contextlib.suppress(psutil.Error):
                    command = " ".join(psutil.Process(key[0]).cmdline())[:100]
                    self._others_names[key] = command or f"pid {key[0]}"
            self._others_last[key] = proc.own
        now = machine_busy()
        busy, total = now[0] - self._machine[0], now[1] - self._machine[1]
        self._machine = now
        pct = 100.0 * CORES * busy / total if total > 0 else 0.0
        self.samples.append(Sample(time.monotonic() - self._t0, pct, cpu))

    def others(self) -> list[tuple[str, float]]:
        """(command, CPU seconds since the first sample) of other processes, most first."""
        used = []
        for key, last in self._others_last.items():
            seconds = last - self._others_first[key]
            if seconds > 0:
                used.append((self._others_names.get(key, f"pid {key[0]}"), seconds))
        return sorted(used, key=lambda u: -u[1])

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()
        self.machine_end = self._machine


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------------------
# Database


def seed(engine: sa.Engine, skills: int) -> None:
    """The default tenant and `skills` published skills of realistic length; no settings row."""
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO tenants (id, name, slug) VALUES (:t, 'Default', 'default')"
                " ON CONFLICT DO NOTHING"
            ),
            {"t": TENANT},
        )
        connection.execute(
            sa.text(SEED_SKILLS_SQL), {"tenants": [TENANT], "tenant_count": 1, "count": skills}
        )
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")


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


def postmaster_pid(pg: LocalPostgres) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


# ------------------------------------------------------------------------------------------
# One configuration


@dataclass
class Servers:
    engine: sa.Engine
    database_url: str
    redis: LocalRedis
    postgres_pid: int
    work: Path


@dataclass
class Options:
    skills: int
    batch_size: int
    settings_row: str
    timeout: float
    request_s: float
    input_s: float


@dataclass
class RunTiming:
    status: str = "ok"  # ok | timeout | call failed
    seconds: float = 0.0  # from the call to the summary (or to the timeout)
    call_seconds: float = 0.0  # the `celery call` process alone
    detected_by: str = ""  # "log" or "database"
    summary: str = ""
    call_output: str = ""
    worker_pids: dict[str, int] = field(default_factory=dict)
    run: dict[str, Any] | None = None


def run_configuration(servers: Servers, workers: int, options: Options) -> dict[str, Any]:
    console.rule(f"{workers} worker(s) + {workers} Ollama(s), {options.skills:,} skills")
    # A fresh run from the same state: no embeddings, no runs, no queued messages, the default
    # tenant's settings as seeded, and new fakes (no stats, a cold cache of their vectors).
    redis.Redis.from_url(servers.redis.url).flushall()
    clear_embeddings(servers.engine)
    reset_settings(servers.engine, options.settings_row)
    fakes = [
        FakeOllamaProcess(
            options.request_s * 1000, options.input_s * 1000, servers.work / f"n{workers}-f{i}.log"
        )
        for i in range(1, workers + 1)
    ]

    base_env = {
        key: value for key, value in os.environ.items() if not key.startswith(("OLLAMA_", "EMBED_"))
    }
    base_env |= {
        "DATABASE_URL": servers.database_url,
        "REDIS_URL": servers.redis.url,
        "EMBED_BATCH_SIZE": str(options.batch_size),
        "PYTHONUNBUFFERED": "1",
    }
    started_workers: list[Worker] = []
    timing = RunTiming()
    try:
        for i, fake in enumerate(fakes, start=1):
            log = servers.work / f"n{workers}-w{i}.log"
            env = {**base_env, "OLLAMA_URL": fake.url}
            started_workers.append(Worker(f"w{i}", env, log).start())
        for worker in started_workers:
            worker.wait_ready()
        time.sleep(1.0)  # let the workers' start-up CPU settle before the baseline
        timing, sampler, call_cpu = timed_backfill(servers, started_workers, fakes, options)
        ollamas = describe_fakes(fakes, timing.seconds, timing.run, options)
    finally:
        for worker in started_workers:
            worker.stop()
        for fake in fakes:
            fake.stop()
    run = timing.run
    return {
        "workers": workers,
        **describe_timing(timing, run, options.skills),
        "site_settings_ollama_url": settings_url(servers.engine),
        "ollamas": ollamas,
        "per_worker": describe_workers(started_workers),
        "cpu": describe_cpu(sampler, call_cpu, workers, timing, run),
    }


def timed_backfill(
    servers: Servers, workers: list[Worker], fakes: list[FakeOllamaProcess], options: Options
) -> tuple[RunTiming, CpuSampler, float]:
    """Call tasks.backfill and wait for its summary, sampling CPU all along."""
    timing = RunTiming(worker_pids={w.name: w.pid for w in workers})
    components: dict[str, tuple[int, str]] = {}
    for worker in workers:
        components[f"{worker.name} main"] = (worker.pid, "root")
        components[f"{worker.name} pool"] = (worker.pid, "descendants")
    components["postgres"] = (servers.postgres_pid, "tree")
    assert servers.redis.process is not None
    components["redis"] = (servers.redis.process.pid, "tree")
    for i, fake in enumerate(fakes, start=1):
        components[f"fake {i}"] = (fake.pid, "tree")
    components["bench process"] = (os.getpid(), "self")
    tail = LogTail([w.log_path for w in workers])
    env = {**workers[0].env, "OLLAMA_URL": APP_DEFAULT_OLLAMA_URL}  # the call embeds nothing

    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = CpuSampler(components)
    sampler.start()
    started = time.monotonic()
    call = subprocess.Popen(
        celery("call", "tasks.backfill"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = started + options.timeout
    next_db_poll = started + DB_POLL_SECONDS
    while True:
        now = time.monotonic()
        if call.returncode is None and call.poll() is not None:
            timing.call_seconds = now - started
            timing.call_output = (call.stdout.read() if call.stdout else b"").decode().strip()
            if call.returncode != 0:
                timing.status = "call failed"
                break
        found = tail.summary()
        if found is not None:
            timing.detected_by = "log"
            timing.summary = f"Done. Embedded {found[0]}/{found[1]} skills. {found[2]} failures."
            break
        if now >= next_db_poll:
            next_db_poll = now + DB_POLL_SECONDS
            run = run_row(servers.engine)
            if run is not None and run["finished"]:
                timing.detected_by = "database"
                break
        if now > deadline:
            timing.status = "timeout"
            break
        time.sleep(POLL_SECONDS)
    timing.seconds = time.monotonic() - started
    timing.run = run_row(servers.engine)  # the run as the clock stopped (a timeout's progress)
    sampler.stop()
    if call.poll() is None:
        call.kill()
    call.wait()
    if not timing.call_seconds:
        timing.call_seconds = timing.seconds
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    call_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    return timing, sampler, call_cpu


# ------------------------------------------------------------------------------------------
# Reports of one configuration


def describe_timing(timing: RunTiming, run: dict[str, Any] | None, skills: int) -> dict[str, Any]:
    current = (run["embedded"] + run["unchanged"]) if run else 0
    return {
        "status": timing.status,
        "seconds": round(timing.seconds, 3),
        # A run that did not close has no rate: its progress is in "run".
        "skills_per_s": (
            round(current / timing.seconds, 1) if timing.seconds and timing.status == "ok" else 0.0
        ),
        "progress": f"{current}/{run['total'] if run else '?'}",
        "call_seconds": round(timing.call_seconds, 3),
        "run_seconds_in_db": round(run["seconds"], 3) if run else None,
        "detected_by": timing.detected_by,
        "summary": timing.summary,
        "run": run,
        "seeded_skills": skills,
        "call_output": timing.call_output[-500:],
    }


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


def describe_workers(workers: list[Worker]) -> dict[str, dict[str, int]]:
    """Per worker, from its log: skills it logged as embedded and embed_skill jobs it ran."""
    out = {}
    for worker in workers:
        log = worker.log()
        out[worker.name] = {
            "skills_logged_embedded": len(re.findall(rb"\] Embedded: ", log)),
            "embed_skill_jobs": len(re.findall(rb"tasks\.embed_skill\[[^\]]+\] succeeded", log)),
        }
    return out


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
    components["fake Ollamas"] = sum(delta.pop(f"fake {i}") for i in range(1, workers + 1))
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


# ------------------------------------------------------------------------------------------
# Report


def report(results: dict[str, Any]) -> None:
    configs: list[dict[str, Any]] = results["configs"]
    base = next((c for c in configs if c["workers"] == 1 and c["status"] == "ok"), None)

    table = Table(
        title=f"Backfill of {results['skills']:,} skills: scale-out", title_justify="left"
    )
    for column in ("workers", "status", "summary", "seconds", "skills/s", "speed-up", "run in DB"):
        table.add_column(column, justify="right")
    for c in configs:
        speedup = (
            f"{c['skills_per_s'] / base['skills_per_s']:.2f}x"
            if base and c["status"] == "ok" and base["skills_per_s"]
            else ""
        )
        table.add_row(
            str(c["workers"]), c["status"],
            c["summary"].removeprefix("Done. ") or f"{c['progress']} when stopped",
            f"{c['seconds']:.2f}",
            f"{c['skills_per_s']:.1f}", speedup,
            f"{c['run_seconds_in_db']:.2f} s" if c["run_seconds_in_db"] is not None else "",
        )  # fmt: skip
    console.print(table)

    table = Table(title="Ollamas (fakes)", title_justify="left")
    for column in (
        "workers", "Ollama", "inputs", "requests", "max concurrent", "share of inputs",
        "slot busy (whole / run)",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for c in configs:
        for o in c["ollamas"]:
            table.add_row(
                str(c["workers"]), str(o["ollama"]), f"{o['inputs']:,}", f"{o['requests']:,}",
                str(o["max_concurrent"]), f"{100 * o['share']:.1f}%",
                f"{o['slot_busy_pct']:.0f}% / {o['slot_busy_run_pct']:.0f}%",
            )  # fmt: skip
    console.print(table)
    for c in configs:
        url = c["site_settings_ollama_url"]
        pinned = next((o["ollama"] for o in c["ollamas"] if o["url"] == url), None)
        where = f" (Ollama {pinned})" if pinned else ""
        per_worker = ", ".join(
            f"{name} logged {w['skills_logged_embedded']} skills embedded and ran"
            f" {w['embed_skill_jobs']} embed_skill jobs"
            for name, w in c["per_worker"].items()
        )
        console.print(
            f"{c['workers']} worker(s): site_settings.ollama_url after the run = {url}{where};"
            f" {per_worker}"
        )

    table = Table(title="CPU seconds during the run (per 1,000 skills)", title_justify="left")
    table.add_column("component")
    for c in configs:
        table.add_column(f"{c['workers']} worker(s)", justify="right")
    names: list[str] = []
    for c in sorted(configs, key=lambda c: -int(c["workers"])):
        names += [n for n in c["cpu"]["components_s"] if n not in names]
    for name in names:
        cells = []
        for c in configs:
            value = c["cpu"]["components_s"].get(name)
            per = c["cpu"]["per_1000_skills_s"].get(name)
            cells.append(
                "" if value is None else f"{value:.2f} ({per:.2f})" if per else f"{value:.2f}"
            )
        table.add_row(name, *cells)
    table.add_row("workers (main + pool)", *[f"{c['cpu']['workers_total_s']:.2f}" for c in configs])
    table.add_row(
        "machine busy",
        *[f"{c['cpu']['machine_busy_s']:.2f}" for c in configs],
        style="bold",
    )
    table.add_row(
        "machine CPU, mean / p90 / max",
        *[
            f"{c['cpu']['machine_pct']:.0f} / {c['cpu']['machine_pct_p90']:.0f} /"
            f" {c['cpu']['machine_pct_max']:.0f}% of {c['cpu']['capacity_pct']}%"
            for c in configs
        ],
    )
    table.add_row("steal", *[f"{c['cpu']['steal_pct']:.1f}%" for c in configs])
    console.print(table)

    for c in configs:
        console.print(f"[bold]{c['workers']} worker(s):[/bold] {c['limit']}")
    for line in results["speedup_lines"]:
        console.print(f"[bold]{line}[/bold]")
    console.print(
        "Note: the fakes sleep through the model's time; a real CPU Ollama would also spend"
        " roughly its slot-busy time as CPU on these cores (model_busy_s in the JSON)."
    )


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


# ------------------------------------------------------------------------------------------
# Main


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
    )

    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    broker = LocalRedis().start()
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": CORES,
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "python": platform.python_version(),
        },
        "skills": args.skills,
        "cost_model_ms": {"request": args.request_ms, "input": args.input_ms},
        "batch_size": args.batch_size,
        "settings_row": args.settings_row,
        "timeout_s": args.timeout,
        "configs": [],
    }
    try:
        database_url = pg.url()
        engine = make_engine(psycopg_url(database_url))
        migrate.upgrade(engine)
        seed(engine, args.skills)
        servers = Servers(engine, database_url, broker, postmaster_pid(pg), work)
        for workers in args.workers:
            config = run_configuration(servers, workers, options)
            config["limit"] = limit_line(config)
            console.print(
                f"{config['status']}: {config['skills_per_s']:.1f} skills/s; {config['limit']}"
            )
            results["configs"].append(config)
        engine.dispose()
    finally:
        broker.stop()
        pg.destroy()
        if args.keep_logs:
            console.print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    results["speedup_lines"] = speedup_lines(results["configs"])
    report(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaleout.json").write_text(json.dumps(results, indent=2))
    console.print(f"wrote {RESULTS / 'scaleout.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
