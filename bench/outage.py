"""How soon does an idle worker serve again after a Redis outage, and what does it log meanwhile?

`python -m bench.outage [--lengths 5 20 60 300] [--rounds 1] [--cold-starts 3]` starts a
throwaway stack whose Redis keeps its data (append-only file), a fake Ollama in its own process
and one worker, started as the README says (`celery -A worker worker --loglevel=INFO`, no other
flag, the worker's own catch-up interval). For each outage length, each round: Redis is
stopped, kept down that long, and started again on the same port; the moment it answers, a
skill is published (committed, then the app's `enqueue_embed_skill`), and the bench times,
from the moment Redis accepts connections again,

  - publish: the publish sent (an append-only Redis answers LOADING while it reads its file),
  - reconnected: the worker's `MainProcess] Connected to ` line (the broker, through its
    screened transport), by that line's own time stamp,
  - embedded: the published skill's row in `skill_embeddings`, seen as it commits,

and counts in the worker's log for that round the tracebacks, the ERROR and WARNING lines, and
the lines that do not start a record (a record broken over several lines). Before that, the
worker's cold start, `--cold-starts` times: from the command spawned to its `ready.` line (as
a user typing it sees it) and to its heartbeat file (consuming: the stack's `started_in`).
Results: bench/results/outage.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from typing import Any

import redis as redis_lib

from bench.harness import Results, RowWatch, console
from devstack import seed
from devstack.seed import TENANT
from devstack.stack import Stack, Worker, stack
from tasks import enqueue_embed_skill

RECONNECTED = "MainProcess] Connected to "
READY = " ready."
COUNTS = ("tracebacks", "errors", "warnings", "broken_records")


def stamp(line: str) -> float:
    """The epoch time of a worker log line, from its `[2026-12-04 03:44:08,123: ...` prefix
    (Celery writes local time, to the millisecond)."""
    return dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_line(text: str, needle: str) -> str | None:
    return next((line for line in text.splitlines() if needle in line), None)


def log_counts(text: str) -> dict[str, int]:
    lines = text.splitlines()
    return {
        "tracebacks": text.count("Traceback"),
        "errors": sum("ERROR/" in line for line in lines),
        "warnings": sum("WARNING/" in line for line in lines),
        "broken_records": sum(bool(line) and not line.startswith("[") for line in lines),
    }


def publish(s: Stack, label: str) -> str:
    """A skill published as the app does it: committed, then its job queued."""
    (skill_id,) = seed.seed_catalog(s.engine, 1, drafts=False, label=label)
    enqueue_embed_skill(skill_id, TENANT, broker_url=s.redis_url)
    return skill_id


def answering(url: str) -> None:
    client = redis_lib.Redis.from_url(url)
    while True:  # an append-only Redis answers LOADING for a moment while it reads its file
        try:
            client.ping()
            break
        except redis_lib.exceptions.BusyLoadingError:
            time.sleep(0.001)
    client.close()


def outage_round(
    s: Stack, worker: Worker, watch: RowWatch, seconds: float, number: int
) -> dict[str, Any]:
    offset = len(worker.log())
    s.redis.stop()
    time.sleep(seconds)
    s.redis.start()  # returns once the port accepts connections
    back_wall, back = time.time(), time.perf_counter()
    answering(s.redis_url)
    # Made now, not before the outage: the worker's catch-up must not queue it first.
    skill_id = publish(s, f"Skill published after outage {number}")
    published = time.perf_counter()
    watch.wait([skill_id], timeout=max(120.0, seconds))
    embedded = time.perf_counter()
    time.sleep(1.0)  # lines the reconnect logs just after it serves belong to this round
    text = worker.log()[offset:]
    connected = first_line(text, RECONNECTED)
    return {
        "outage_s": seconds,
        "publish_s": published - back,
        "reconnected_s": None if connected is None else stamp(connected) - back_wall,
        "embedded_s": embedded - back,
        **log_counts(text),
    }


def cold_start(s: Stack, env: dict[str, str], number: int) -> tuple[float, float]:
    """(spawn -> `ready.`, spawn -> heartbeat) of one worker, stopped after."""
    spawned = time.time()
    worker = s.worker(env, name=f"cold-{number}", loglevel="INFO")
    deadline = time.monotonic() + 60
    while (ready := first_line(worker.log(), READY)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no `ready.` line from the worker:\n{worker.log()[-3000:]}")
        time.sleep(0.01)
    worker.stop()
    return stamp(ready) - spawned, worker.started_in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__)
    parser.add_argument("--lengths", type=float, nargs="*", default=[5, 20, 60, 300],
                        help="outage lengths in seconds (none: the cold starts only)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="outages of each length")
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = parser.parse_args(argv)
    results = Results("outage", lengths=args.lengths, rounds=args.rounds,
                      cold_starts=args.cold_starts)  # fmt: skip
    with stack(prefix="bench-outage-", durable_redis=True, keep=args.keep_logs) as s:
        fake = s.fake(0.0, 0.0)
        seed.add_tenants(s.engine, ollama_url=fake.url)
        env = s.env(fake.url)
        # The worker as typed: its own catch-up interval, whose turns an outage may skip.
        del env["CATCH_UP_INTERVAL_SECONDS"]
        starts = [cold_start(s, env, i) for i in range(args.cold_starts)]
        if starts:
            ready, heartbeat = [a for a, _ in starts], [b for _, b in starts]
            results.add("cold start, command to `ready.`, median", statistics.median(ready), "s")
            results.add("cold start, command to heartbeat (consuming), median",
                        statistics.median(heartbeat), "s")  # fmt: skip
            results.details["cold_start_s"] = {"ready": ready, "heartbeat": heartbeat}
        worker = s.worker(env, loglevel="INFO")
        results.details["mingle_at_start"] = "mingle: searching for neighbors" in worker.log()
        watch = RowWatch(s.database_url)
        watch.wait([publish(s, "Skill published before any outage")])  # warm: connections
        rounds: list[dict[str, Any]] = []
        for length in args.lengths:
            for n in range(1, args.rounds + 1):
                console.print(f"Redis down {length:.0f} s, round {n}")
                row = outage_round(s, worker, watch, length, len(rounds))
                rounds.append(row)
                label = f"outage {length:.0f} s, round {n}"
                results.add(f"{label}: publish sent", row["publish_s"], "s")
                if row["reconnected_s"] is None:
                    console.print(f"[red]{label}: no `{RECONNECTED.strip()}` line in its log")
                else:
                    results.add(f"{label}: reconnected", row["reconnected_s"], "s")
                results.add(f"{label}: embedded", row["embedded_s"], "s")
                for count in COUNTS:
                    unit = "tracebacks" if count == "tracebacks" else "lines"
                    results.add(f"{label}: {count.replace('_', ' ')}", row[count], unit)
        watch.close()
        results.details["rounds"] = rounds
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
