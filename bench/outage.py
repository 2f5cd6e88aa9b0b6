"""How soon an idle worker serves again after a Redis outage, and what it logs meanwhile.

`python -m bench.outage [--lengths 5 20 60 300] [--rounds 1] [--cold-starts 3]` starts a
throwaway PostgreSQL, a Redis that keeps its data (append-only file), a fake Ollama in its own
process and one worker, started as the README says (`celery -A worker worker --loglevel=INFO`,
no other flag). For each outage length, each round: Redis is stopped, kept down that long, and
started again on the same port; the moment it accepts connections a publish is sent (the app's
`enqueue_embed_skill`), and the bench times, from that moment,

  - reconnected: the worker's `Connected to ...` line appearing in its log,
  - embedded: the published skill's row in `skill_embeddings`,

and counts in the worker's log for that round the tracebacks, the ERROR and WARNING lines,
and the lines that do not start a record (a record spread over several lines). Before that,
the worker's cold start as typed: the command spawned to its `ready.` line, `--cold-starts`
times. Results print and go to bench/results/outage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis as redis_lib
import sqlalchemy as sa

from bench.throughput import RESULTS, TENANT, psycopg_url, seed_catalog
from db import migrate
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.producer import enqueue_embed_skill

WORKER = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO"]
RECONNECTED = "MainProcess] Connected to "


class Worker:
    """The worker process, its log, and a watcher that notes when lines first appear."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.spawned = time.monotonic()
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                WORKER, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._seen: list[tuple[float, int]] = []  # (when first seen, count of RECONNECTED)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _watch(self) -> None:
        count = 0
        while not self._stop.is_set():
            now = self.text().count(RECONNECTED)
            if now != count:
                count = now
                self._seen.append((time.monotonic(), count))
            time.sleep(0.005)

    def connected_since(self, moment: float, before: int) -> float | None:
        """When a reconnect line beyond the first `before` was first seen after `moment`."""
        for seen, count in self._seen:
            if count > before and seen >= moment:
                return seen
        return None

    def wait_ready(self, timeout: float = 120) -> float:
        while " ready." not in self.text():
            if self.process.poll() is not None or time.monotonic() - self.spawned > timeout:
                raise RuntimeError(f"the worker did not start:\n{self.text()[-3000:]}")
            time.sleep(0.005)
        return time.monotonic() - self.spawned

    def stop(self) -> None:
        self._stop.set()
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def log_counts(text: str) -> dict[str, int]:
    lines = text.splitlines()
    return {
        "tracebacks": text.count("Traceback"),
        "errors": sum("ERROR/" in line for line in lines),
        "warnings": sum("WARNING/" in line for line in lines),
        "continuation_lines": sum(bool(line) and not line.startswith("[") for line in lines),
    }


def embedded(engine: sa.Engine, skill_id: str) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.execute(
                sa.text("SELECT 1 FROM skill_embeddings WHERE skill_id = :id"), {"id": skill_id}
            ).scalar()
        )


def add_skill(engine: sa.Engine, name: str) -> str:
    """A skill published as the app does it: committed, then its job queued."""
    skill_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO skills (id, tenant_id, name, description, status)"
                    " VALUES (:id, :t, :name, 'Published as Redis returns', 'published')"),
            {"id": skill_id, "t": TENANT, "name": name},
        )  # fmt: skip
    return skill_id


def outage_round(
    worker: Worker, server: LocalRedis, engine: sa.Engine, seconds: float, number: int
) -> dict[str, Any]:
    offset = len(worker.text())
    before = worker.text().count(RECONNECTED)
    server.stop()
    time.sleep(seconds)
    server.start()  # returns once the port accepts connections
    back = time.monotonic()
    client = redis_lib.Redis.from_url(server.url)
    while True:  # an append-only Redis answers LOADING for a moment while it reads its file
        try:
            client.ping()
            break
        except redis_lib.exceptions.BusyLoadingError:
            time.sleep(0.001)
    client.close()
    # Made now, not before the outage: the workers' catch-up must not queue it first.
    skill_id = add_skill(engine, f"Skill published after outage {number}")
    queued = enqueue_embed_skill(skill_id, TENANT, broker_url=server.url)
    published = time.monotonic()
    deadline = back + max(120.0, seconds)
    while not embedded(engine, skill_id):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not embedded {deadline - back:.0f} s after Redis returned")
        time.sleep(0.005)
    done = time.monotonic()
    time.sleep(1.0)  # lines the reconnect logs just after it serves belong to this round
    connected = worker.connected_since(back - 0.05, before)
    return {
        "outage_s": seconds,
        "queued": queued,
        "publish_s": published - back,
        "reconnected_s": None if connected is None else connected - back,
        "embedded_s": done - back,
        **log_counts(worker.text()[offset:]),
    }


def cold_starts(env: dict[str, str], work: Path, times: int) -> list[float]:
    seconds = []
    for i in range(times):
        worker = Worker(env, work / f"cold-{i}.log")
        try:
            seconds.append(worker.wait_ready())
        finally:
            worker.stop()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__)
    parser.add_argument("--lengths", type=float, nargs="*", default=[5, 20, 60, 300],
                        help="outage lengths in seconds (none: the cold starts only)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="outages of each length")
    parser.add_argument("--cold-starts", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    server = LocalRedis(data_dir=work / "redis").start()
    fake = FakeOllamaProcess(0.0, 0.0, work / "fake.log")
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    worker: Worker | None = None
    try:
        engine = sa.create_engine(psycopg_url(pg.url()))
        migrate.upgrade(engine)
        seed_catalog(engine, 0, fake.url)
        env = {**os.environ, "DATABASE_URL": pg.url(), "REDIS_URL": server.url,
               "OLLAMA_URL": fake.url, "HEALTH_DIR": str(work / "health"),
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        starts = cold_starts(env, work, args.cold_starts)
        if starts:
            results["cold_start_s"] = {"median": statistics.median(starts), "all": starts}
            print(f"cold start, spawn to ready.: median {statistics.median(starts):.2f} s"
                  f" ({', '.join(f'{s:.2f}' for s in starts)})")  # fmt: skip
        worker = Worker(env, work / "worker.log")
        worker.wait_ready()
        start_log = worker.text()
        results["mingle_at_start"] = "mingle: searching for neighbors" in start_log
        warm = add_skill(engine, "Skill published before any outage")
        enqueue_embed_skill(warm, TENANT, broker_url=server.url)
        while not embedded(engine, warm):
            time.sleep(0.01)
        results["rounds"] = []
        print("outage_s  publish_s  reconnected_s  embedded_s  " + "  ".join(log_counts("")))
        for length in args.lengths:
            for _ in range(args.rounds):
                row = outage_round(worker, server, engine, length, len(results["rounds"]))
                results["rounds"].append(row)
                reconnected = row["reconnected_s"]
                back = "-" if reconnected is None else f"{reconnected:.3f}"
                counts = "".join(f"{row[k]:>{len(k) + 2}d}" for k in log_counts(""))
                print(f"{length:8.0f}  {row['publish_s']:9.3f}  {back:>13}  "
                      f"{row['embedded_s']:10.3f}{counts}", flush=True)  # fmt: skip
        engine.dispose()
    finally:
        if worker is not None:
            worker.stop()
        fake.process.terminate()
        server.stop()
        pg.destroy()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "outage.json").write_text(json.dumps(results, indent=2))
    print(f"worker logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
