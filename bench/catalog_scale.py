"""What does a big catalog cost when little of it changed?

`python -m bench.catalog_scale [--skills 200000] [--tenants 20] [--edits 1000]` starts a
throwaway stack, a fake Ollama in its own process (the CPU model's cost: 7.5 ms a
request + 4.3 ms an input) and one worker, seeds N published skills over T tenants, each with a
current embedding (vectors written in SQL; the HNSW index is dropped first: none of the steps
timed here reads it, and building it over N vectors would take minutes), then times, as a user
types them:

  (a) `celery -A worker call tasks.backfill` with nothing to do, from the command to its
      summary (the run closed), and the inputs it sent to Ollama (none, if nothing changed);
  (b) `python -m worker status` (its per-tenant coverage);
  (c) a backfill after --edits edits spread over the tenants, beside the model's own time for
      those edits (the fake's busy time);
  (d) one catch-up turn (`tasks.reconcile` through `CatchUp.tick`) with everything current;
  (e) the worker's own tables after (a) and (c): rows and bytes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import sqlalchemy as sa

from bench.harness import Backfill, Results, catch_up_turns, console
from bench.harness import backfill as timed_backfill
from devstack import seed


def edit(engine: sa.Engine, count: int) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE skills SET description = description || ' (edited)', updated_at = now()"
                " WHERE id IN (SELECT id FROM skills WHERE status = 'published'"
                " ORDER BY md5(id) LIMIT :n)"
            ),
            {"n": count},
        )


def own_tables(engine: sa.Engine) -> dict[str, dict[str, int]]:
    sizes = {}
    with engine.connect() as connection:
        for table in ("embedding_runs", "embedding_run_items", "embedding_failures"):
            rows = connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
            size = connection.exec_driver_sql(
                f"SELECT pg_total_relation_size('{table}')"
            ).scalar_one()
            sizes[table] = {"rows": int(rows), "bytes": int(size)}
    return sizes


def summary(run: Backfill) -> str:
    return (f"{run.embedded} embedded, {run.unchanged} unchanged, {run.failed} failed"
            f" of {run.total}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from devstack.stack import stack

    parser = argparse.ArgumentParser(prog="python -m bench.catalog_scale", description=__doc__)
    parser.add_argument("--skills", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--edits", type=int, default=1000)
    args = parser.parse_args(argv)
    results = Results("catalog_scale", skills=args.skills, tenants=args.tenants,
                      edits=args.edits)  # fmt: skip
    label = f"{args.skills:,} skills over {args.tenants} tenants"
    with stack(prefix="bench-catalog-scale-") as s:
        ollama = s.fake(7.5, 4.3)
        started = time.perf_counter()
        seed.add_tenants(s.engine, seed.tenant_ids(args.tenants))
        seed.drop_vector_index(s.engine)
        seed.seed_catalog(s.engine, args.skills, seed.tenant_ids(args.tenants), current=True)
        seed.analyze(s.engine)
        results.add(f"seeding {label}, all current", time.perf_counter() - started, "s")
        env = s.env(ollama.url)
        s.worker(env)

        ollama.reset()
        run = timed_backfill(s.engine, env)
        results.add(f"{label}: backfill, nothing changed, command -> summary", run.summary_s, "s")
        results.add(f"{label}: backfill, nothing changed, found unchanged", run.unchanged,
                    "skills")  # fmt: skip
        results.add(f"{label}: backfill, nothing changed, Ollama inputs", ollama.inputs,
                    "inputs", target="0")  # fmt: skip
        results.details["unchanged_backfill"] = summary(run)

        times = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "worker", "status"], env=env,
                           capture_output=True, check=True)  # fmt: skip
            times.append(time.perf_counter() - started)
        results.add(f"{label}: `python -m worker status`, best of 3", min(times), "s")

        edit(s.engine, args.edits)
        ollama.reset()
        run = timed_backfill(s.engine, env)
        stats = ollama.stats()
        model = 0.0075 * stats["requests"] + 0.0043 * stats["inputs"]
        edited = f"{label}: backfill after {args.edits:,} edits"
        results.add(f"{edited}, command -> summary", run.summary_s, "s")
        results.add(f"{edited}, the model's own time", model, "s")
        results.add(f"{edited}, fixed cost (the rest)", run.summary_s - model, "s")
        results.add(f"{edited}, Ollama requests", stats["requests"], "requests")
        results.add(f"{edited}, Ollama inputs", stats["inputs"], "inputs")
        results.details["edited_backfill"] = summary(run)

        for table, size in own_tables(s.engine).items():
            results.add(f"{label}: {table} after both backfills, rows", size["rows"], "rows")
            results.add(f"{label}: {table} after both backfills, size", size["bytes"] / 2**20,
                        "MB")  # fmt: skip
        console.print("(d) catch-up turns")
        turns = catch_up_turns(s.database_url, s.redis_url, 3)
        results.add(f"{label}: catch-up turn, all current, best of 3", min(turns), "s")
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
