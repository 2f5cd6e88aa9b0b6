"""What every bench shares: its results' one format, the clocks it reads and the loops it times.

The servers come from devstack.stack (PostgreSQL, Redis, fake Ollamas, workers) and catalogs
from devstack.seed. Here: `Results` (figures, written as bench/results/<bench>.json and printed
as one table), `percentile`, `CpuSampler` (every process's CPU from one pass over /proc, by
psutil), the seed plan's loop, a timed backfill, the queues drained, rows seen as they commit,
and PostgreSQL's write ceiling.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis as redis_lib
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from devstack.seed import MODEL, TENANT
from devstack.stack import CELERY

RESULTS = Path(__file__).resolve().parent / "results"
CORES = os.cpu_count() or 1
console = Console(width=max(Console().width, 120))


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (0..1) of `values`, nearest rank; 0.0 for none."""
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def model_limit(request_ms: float, input_ms: float, batch: int = 32) -> float | None:
    """Skills a second Ollama alone allows: a batch holds its one slot request + batch x input."""
    batch_ms = request_ms + batch * input_ms
    return batch / batch_ms * 1000 if batch_ms else None


# ------------------------------------------------------------------------------------------
# Results


def machine() -> dict[str, Any]:
    return {
        "cores": CORES,
        "load": [round(x, 2) for x in os.getloadavg()],
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
    }


def _number(value: float) -> str:
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return (
        f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    )


class Results:
    """One bench's figures: {"bench", "when", "machine": {cores, load, ...}, "settings",
    "figures": [{"name", "value", "unit", "limit"?: {"name", "value"}, "target"?}], "details"}.
    The machine's load is read when the bench starts and when it ends (`load_end`): a loaded
    machine says so beside its figures."""

    def __init__(self, bench: str, **settings: Any) -> None:
        self.bench = bench
        self.when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.machine = machine()
        self.settings = settings
        self.figures: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        *,
        limit: tuple[str, float] | None = None,
        target: str | None = None,
    ) -> float:
        # A count stays an int; a measure keeps four decimals.
        number = value if isinstance(value, int) else round(float(value), 4)
        figure: dict[str, Any] = {"name": name, "value": number, "unit": unit}
        if limit is not None:
            figure["limit"] = {"name": limit[0], "value": round(float(limit[1]), 4)}
        if target is not None:
            figure["target"] = target
        self.figures.append(figure)
        console.print(f"  {name}: {_number(number)} {unit}")
        return value

    def as_json(self) -> dict[str, Any]:
        load_end = [round(x, 2) for x in os.getloadavg()]
        return {"bench": self.bench, "when": self.when,
                "machine": {**self.machine, "load_end": load_end}, "settings": self.settings,
                "figures": self.figures, "details": self.details}  # fmt: skip

    def write(self) -> Path:
        """bench/results/<bench>.json, and the figures as a table."""
        payload = self.as_json()
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.bench}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        load = payload["machine"]
        table = Table(
            title=f"bench.{self.bench}, {self.when}, {CORES} cores, load {load['load'][0]:.2f}"
            f" -> {load['load_end'][0]:.2f}",
            title_justify="left",
        )
        for column in ("measure", "value", "limit", "target"):
            table.add_column(column, justify="left" if column == "measure" else "right")
        for f in self.figures:
            limit = f.get("limit")
            table.add_row(
                f["name"], f"{_number(f['value'])} {f['unit']}",
                f"{limit['name']} {_number(limit['value'])}" if limit else "",
                f.get("target", ""),
            )  # fmt: skip
        console.print(table)
        console.print(f"wrote {path}")
        return path


# ------------------------------------------------------------------------------------------
# CPU


@dataclass(frozen=True)
class _Proc:
    ppid: int
    own: float  # user + system of the process itself
    reaped: float  # user + system of its children it has waited for


def _snapshot() -> dict[tuple[int, float], _Proc]:
    """Every process on the machine, keyed by (pid, create time): one pass over /proc."""
    procs: dict[tuple[int, float], _Proc] = {}
    for process in psutil.process_iter(["ppid", "create_time", "cpu_times"]):
        info = process.info
        times = info["cpu_times"]
        if times is None or info["ppid"] is None:
            continue  # gone, or not readable
        procs[(process.pid, float(info["create_time"] or 0.0))] = _Proc(
            int(info["ppid"]),
            float(times.user + times.system),
            float(times.children_user + times.children_system),
        )
    return procs


def _descendants(procs: dict[tuple[int, float], _Proc], root: int) -> set[int]:
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


def _machine_busy() -> tuple[float, float, float]:
    """(busy, total, steal) CPU seconds summed over all cores since boot."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq  # guest time is inside user already
    total = busy + t.idle + t.iowait + t.steal
    return float(busy), float(total), float(t.steal)


@dataclass
class Sample:
    t: float  # seconds since the first sample
    machine_pct: float  # since the previous sample; 100 = one core
    cpu: dict[str, float]  # cumulative CPU seconds per component


class CpuSampler(threading.Thread):
    """The machine's CPU and each component's cumulative CPU seconds, sampled at creation, at
    `stop()`, and every `interval` in between once `start()`ed (without it: two samples).

    `components` maps a name to (pid, part): "root" is the process itself plus the children it
    has reaped, "descendants" its live descendants (each with what it reaped), "tree" both,
    "self" this process's own threads only. A component whose processes are gone keeps its last
    value. Every other process on the machine is tracked too (`others`), so a machine shared
    with other work shows as such rather than as the bench's load."""

    def __init__(self, components: dict[str, tuple[int, str]], interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.components = components
        self.interval = interval
        self.samples: list[Sample] = []
        self._halt = threading.Event()
        self._last: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._wall_t0 = time.time()
        self._others_first: dict[tuple[int, float], float] = {}
        self._others_last: dict[tuple[int, float], float] = {}
        self._others_names: dict[tuple[int, float], str] = {}
        self._machine = _machine_busy()
        self.machine_start = self.machine_end = self._machine
        self.sample()

    def sample(self) -> None:
        procs = _snapshot()
        by_pid = {pid: proc for (pid, _), proc in procs.items()}
        ours = {os.getpid(), *_descendants(procs, os.getpid())}
        cpu: dict[str, float] = {}
        for name, (root, part) in self.components.items():
            below = _descendants(procs, root) if part in ("descendants", "tree") else set()
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
        now = _machine_busy()
        busy, total = now[0] - self._machine[0], now[1] - self._machine[1]
        self._machine = now
        pct = 100.0 * CORES * busy / total if total > 0 else 0.0
        self.samples.append(Sample(time.monotonic() - self._t0, pct, cpu))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> CpuSampler:
        self._halt.set()
        if self.ident is not None:
            self.join()
        self.sample()
        self.machine_end = self._machine
        return self

    def used(self) -> dict[str, float]:
        """CPU seconds of each component from the first sample to the last."""
        first, last = self.samples[0], self.samples[-1]
        return {name: max(0.0, last.cpu[name] - first.cpu[name]) for name in first.cpu}

    def others(self) -> list[tuple[str, float]]:
        """(command, CPU seconds since the first sample) of other processes, most first."""
        used = []
        for key, last in self._others_last.items():
            seconds = last - self._others_first[key]
            if seconds > 0:
                used.append((self._others_names.get(key, f"pid {key[0]}"), seconds))
        return sorted(used, key=lambda u: -u[1])


def worker_parts(pid: int) -> dict[str, tuple[int, str]]:
    """A worker's main process and its pool process(es), as CpuSampler components."""
    return {"main": (pid, "root"), "pool": (pid, "descendants")}


def tree_rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    members = [process, *process.children(recursive=True)]
    return sum(int(p.memory_info().rss) for p in members) / 2**20


# ------------------------------------------------------------------------------------------
# The loops timed


def sequential_loop(engine: sa.Engine, ollama_url: str, tenant: str = TENANT) -> tuple[int, float]:
    """The seed plan, faithfully: select the published skills; for each, one POST /api/embed
    and one committed upsert, in order. Returns (skills, seconds)."""
    import httpx

    from db import catalog
    from db.catalog import input_hash, skill_text
    from db.sql import tenant_scope

    started = time.perf_counter()
    with tenant_scope(engine, tenant) as conn:
        skills = list(catalog.iter_published_skills(conn, tenant))
    with httpx.Client(timeout=10.0) as client:
        for skill in skills:
            text = skill_text(skill.name, skill.description)
            response = client.post(f"{ollama_url}/api/embed", json={"model": MODEL, "input": text})
            response.raise_for_status()
            vector = response.json()["embeddings"][0]
            with tenant_scope(engine, tenant) as conn:
                catalog.write_current(conn, tenant, [
                    catalog.VectorRow(skill.id, text, vector, MODEL, 768, input_hash(text))
                ])  # fmt: skip
    return len(skills), time.perf_counter() - started


@dataclass(frozen=True)
class Backfill:
    """Seconds from starting `tasks.backfill` to: its call returning, the first row written
    (when asked), the run's summary (finished_at), the last of its jobs leaving the queues and
    the workers (when asked); and the run's counts."""

    run_id: str
    call_s: float
    first_row_s: float | None
    summary_s: float
    drained_s: float | None
    total: int
    embedded: int
    unchanged: int
    failed: int


def backfill(
    engine: sa.Engine,
    env: dict[str, str],
    *,
    command: bool = True,
    first_row: bool = False,
    drain: bool = False,
    poll: float = 0.003,
    timeout: float = 1800.0,
    check: bool = True,
) -> Backfill:
    """Start `tasks.backfill` as a user does (`celery -A worker call tasks.backfill`, timed from
    the command) or, without `command`, by `send_task` from this process; poll its run.
    `first_row` assumes skill_embeddings was empty. Raises TimeoutError past `timeout`, and
    RuntimeError on failures when `check`."""
    started = time.perf_counter()
    if command:
        call = subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        run_id = call.stdout.strip()
    else:
        from celery import Celery

        from tasks import INTERACTIVE

        app = Celery("bench", broker=env["REDIS_URL"], set_as_current=False)
        run_id = str(app.send_task("tasks.backfill", queue=INTERACTIVE).id)
        app.close()
    called = time.perf_counter() - started
    written = ", EXISTS (SELECT 1 FROM skill_embeddings) AS written" if first_row else ""
    first: float | None = None
    with engine.connect() as connection:
        while True:
            row = connection.execute(
                sa.text(
                    f"SELECT total, embedded, unchanged, failed, finished_at{written}"
                    " FROM embedding_runs WHERE id = :id"
                ),
                {"id": run_id},
            ).one_or_none()
            connection.commit()
            now = time.perf_counter() - started
            if first_row and first is None and row is not None and row.written:
                first = now
            if row is not None and row.finished_at is not None:
                break
            if now > timeout:
                raise TimeoutError(f"backfill {run_id} did not finish in {timeout:.0f} s")
            time.sleep(poll)
    summary = time.perf_counter() - started
    drained_s = None
    if drain:
        drained(env["REDIS_URL"])
        drained_s = time.perf_counter() - started
    if check and row.failed:
        raise RuntimeError(f"backfill {run_id}: {row.failed} failures")
    return Backfill(run_id, called, first if first is not None else (summary if first_row
                    else None), summary, drained_s, int(row.total), int(row.embedded),
                    int(row.unchanged), int(row.failed))  # fmt: skip


def drained(redis_url: str, poll: float = 0.003) -> None:
    """Until no job waits in a queue or in a worker (kombu keeps a worker's messages in the
    "unacked" hash until it acks them)."""
    from tasks import BULK, CELERY_DEFAULT, INTERACTIVE

    client = redis_lib.Redis.from_url(redis_url)
    while any(client.llen(q) for q in (CELERY_DEFAULT, INTERACTIVE, BULK)) or client.hlen(
        "unacked"
    ):
        time.sleep(poll)
    client.close()


class RowWatch:
    """When skills' rows are committed: a trigger of the bench's own database notifies at each
    commit, so a publish is timed to the moment its row becomes visible, and no polling query
    competes with the worker for the cores."""

    def __init__(self, url: str) -> None:
        self.connection = psycopg.connect(url, autocommit=True)
        self.connection.execute(
            "CREATE OR REPLACE FUNCTION bench_row_written() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN PERFORM pg_notify('bench_rows', NEW.skill_id::text); RETURN NULL;"
            " END $$"
        )
        self.connection.execute(
            "CREATE OR REPLACE TRIGGER bench_row_written AFTER INSERT OR UPDATE ON"
            " skill_embeddings FOR EACH ROW EXECUTE FUNCTION bench_row_written()"
        )
        self.connection.execute("LISTEN bench_rows")

    def wait(self, ids: list[str], timeout: float = 600) -> None:
        """Until each of `ids` has a row written after this call began."""
        left = set(ids)
        deadline = time.monotonic() + timeout
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{len(left)} skills were not embedded in time")
            for notice in self.connection.notifies(timeout=remaining, stop_after=1):
                left.discard(notice.payload)

    def close(self) -> None:
        self.connection.close()


def write_ceiling(engine: sa.Engine, count: int, batch: int = 32) -> dict[str, float]:
    """PostgreSQL's write ceiling: our upsert of `count` vectors, `batch` a statement, from one
    connection, with nothing else running: once with the app's HNSW index, once without it.
    It empties skill_embeddings and drops the index: run it last."""
    from db import catalog
    from db.sql import tenant_scope

    with engine.connect() as connection:
        skills = [
            str(r.id)
            for r in connection.execute(
                sa.text("SELECT id FROM skills WHERE status = 'published' ORDER BY id LIMIT :n"),
                {"n": count},
            )
        ]
    rng = random.Random(7)
    vectors = [[rng.gauss(0, 1) for _ in range(768)] for _ in range(len(skills))]
    rates: dict[str, float] = {}
    for label in ("with", "without"):
        with engine.begin() as connection:
            connection.exec_driver_sql("TRUNCATE skill_embeddings")
        started = time.perf_counter()
        for start in range(0, len(skills), batch):
            rows = [
                catalog.VectorRow(skill_id, "", vectors[start + i], MODEL, 768, "bench")
                for i, skill_id in enumerate(skills[start : start + batch])
            ]
            with tenant_scope(engine, TENANT) as conn:
                catalog.write_current(conn, TENANT, rows, checked=False)
        rates[label] = len(skills) / (time.perf_counter() - started)
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP INDEX IF EXISTS skill_embeddings_embedding_idx")
    return {
        "with_index_rows_per_s": rates["with"],
        "without_index_rows_per_s": rates["without"],
        "index_ms_per_row": 1000 / rates["with"] - 1000 / rates["without"],
    }


def catch_up_turns(database_url: str, redis_url: str, rounds: int) -> list[float]:
    """Seconds of each of `rounds` catch-up turns (`CatchUp.tick`: the Redis lock, the bulk
    lane's check, `tasks.reconcile`), run in this process, each in a fresh interval."""
    os.environ.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
    import worker.celery_app  # noqa: F401  (the app the tasks send through, on this Redis)
    from tasks import runtime
    from tasks.jobs import reconcile
    from worker.catch_up import LOCK_NAME, CatchUp
    from worker.settings import Settings

    rt = runtime.install(Settings())
    catch_up = CatchUp(rt.redis, reconcile, interval=60)
    times = []
    for _ in range(rounds):
        rt.redis.delete(LOCK_NAME)  # a new interval: the turn is free
        started = time.perf_counter()
        assert catch_up.tick()
        times.append(time.perf_counter() - started)
    return times
