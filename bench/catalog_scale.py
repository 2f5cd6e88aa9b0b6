"""What a big catalog costs when little of it changed (numbers, not assertions).

`python -m bench.catalog_scale [--skills 200000] [--tenants 20] [--edits 1000]` starts a
throwaway PostgreSQL, Redis, a fake Ollama in its own process (the CPU model's cost: 7.5 ms a
request + 4.3 ms an input) and one worker, seeds N published skills over T tenants, each with a
current embedding (vectors written in SQL; the HNSW index is dropped first: none of the steps
timed here reads it, and building it over N vectors would take minutes), then times, as a user
types them:

  (a) `celery -A worker call tasks.backfill` with nothing to do, from the command to its
      summary line in the worker's log;
  (b) `python -m worker status` (its per-tenant coverage);
  (c) a backfill after --edits edits spread over the tenants, beside the model's own time for
      those edits (the fake's busy time);
  (d) one catch-up turn (`tasks.reconcile` through `CatchUp.tick`) with everything current;
  (e) the worker's own tables after (a) and (c): rows and bytes.

Results print and go to bench/results/catalog_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.throughput import RESULTS, psycopg_url
from db import migrate
from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis

CELERY = [sys.executable, "-m", "celery"]
SUMMARY = re.compile(r"Done\. Embedded (\d+)/(\d+) skills\. (\d+) failures\.")
TEXT_HASH = "encode(sha256(convert_to(name || ' ' || coalesce(description, ''), 'UTF8')), 'hex')"


def seed(engine: sa.Engine, skills: int, tenants: int) -> list[str]:
    """`skills` published skills over `tenants` tenants (plus 5% drafts), all current."""
    ids = [f"tenant-{t:04d}-0000-0000-000000000000" for t in range(tenants)]
    ids[0] = "default-tenant-000-0000-000000000000"
    per = skills // tenants
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX IF EXISTS skill_embeddings_embedding_idx")
        for tenant in ids:
            connection.execute(
                sa.text("INSERT INTO tenants (id, name) VALUES (:t, :t)"), {"t": tenant}
            )
            connection.execute(
                sa.text(
                    "INSERT INTO site_settings (id, tenant_id, semantic_similarity_enabled)"
                    " VALUES (:t, :t, true)"
                ),
                {"t": tenant},
            )
        connection.execute(
            sa.text(
                """
                INSERT INTO skills (id, tenant_id, name, description, status)
                SELECT gen_random_uuid()::text, t.id, 'Skill ' || n || ' of ' || t.id,
                       repeat('Reads the input, finds what matters and writes it up. ', 3) || n,
                       CASE WHEN n % 20 = 0 THEN 'draft' ELSE 'published' END
                FROM unnest(CAST(:tenants AS text[])) AS t(id),
                     generate_series(1, :n) AS n
                """
            ),
            {"tenants": ids, "n": int(per * 20 / 19) + 1},
        )
        connection.exec_driver_sql(
            "INSERT INTO skill_embeddings (id, tenant_id, skill_id, embedding, model_name,"
            " dimensions, input_hash) SELECT gen_random_uuid()::text, tenant_id, id,"
            " array_fill(0.01, ARRAY[768])::vector, 'nomic-embed-text', 768, "
            f"{TEXT_HASH} FROM skills WHERE status = 'published'"
        )
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    return ids


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


def backfill(env: dict[str, str], log: Path, summaries: int) -> tuple[float, str]:
    """Seconds from `celery -A worker call tasks.backfill` to the next summary in the log."""
    started = time.perf_counter()
    subprocess.run([*CELERY, "-A", "worker", "call", "tasks.backfill"], env=env,
                   capture_output=True, check=True)  # fmt: skip
    while len(found := SUMMARY.findall(log.read_text(errors="replace"))) <= summaries:
        if time.perf_counter() - started > 600:
            raise RuntimeError(f"no summary: {log.read_text()[-3000:]}")
        time.sleep(0.005)
    line = "Done. Embedded {}/{} skills. {} failures.".format(*found[-1])
    return time.perf_counter() - started, line


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


def catch_up_turn(env: dict[str, str]) -> float:
    """One catch-up turn, all current, in a process of its own (it imports the tasks)."""
    code = (
        "import time, worker.celery_app\n"
        "from tasks import runtime\nfrom tasks.jobs import reconcile\n"
        "from worker.catch_up import LOCK_NAME, CatchUp\nfrom worker.settings import Settings\n"
        "rt = runtime.install(Settings())\ncatch_up = CatchUp(rt.redis, reconcile, interval=60)\n"
        "times = []\n"
        "for _ in range(3):\n"
        "    rt.redis.delete(LOCK_NAME)\n    s = time.perf_counter()\n"
        "    assert catch_up.tick()\n    times.append(time.perf_counter() - s)\n"
        "print(min(times))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skills", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--edits", type=int, default=1000)
    args = parser.parse_args()
    results: dict[str, Any] = {"skills": args.skills, "tenants": args.tenants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = LocalPostgres(work / "pg", durable=False).start()
        broker = LocalRedis().start()
        ollama = FakeOllamaProcess(7.5, 4.3, work / "ollama.log")
        worker: subprocess.Popen[bytes] | None = None
        try:
            server.psql("CREATE DATABASE bench")
            url = server.url(database="bench")
            engine = sa.create_engine(psycopg_url(url))
            migrate.upgrade(engine)
            started = time.perf_counter()
            seed(engine, args.skills, args.tenants)
            print(f"seeded {args.skills} skills in {time.perf_counter() - started:.1f} s")
            env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": broker.url,
                   "OLLAMA_URL": ollama.url, "HEALTH_DIR": str(work / "health")}  # fmt: skip
            log = work / "worker.log"
            with log.open("wb") as output:
                worker = subprocess.Popen(
                    [*CELERY, "-A", "worker", "worker", "--loglevel=INFO"], env=env,
                    stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            while "ready." not in log.read_text(errors="replace"):
                if worker.poll() is not None:
                    raise RuntimeError(log.read_text()[-3000:])
                time.sleep(0.05)

            seconds, line = backfill(env, log, 0)
            results["unchanged_backfill"] = {"seconds": seconds, "summary": line}
            print(f"(a) backfill, nothing changed: {seconds:.2f} s  {line}")

            times = []
            for _ in range(3):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "worker", "status"], env=env,
                               capture_output=True, check=True)  # fmt: skip
                times.append(time.perf_counter() - started)
            results["status_seconds"] = min(times)
            print(f"(b) python -m worker status: {min(times):.2f} s (best of 3)")

            edit(engine, args.edits)
            ollama.reset()
            seconds, line = backfill(env, log, 1)
            stats = ollama.stats()
            model = 0.0075 * stats["requests"] + 0.0043 * stats["inputs"]
            results["edited_backfill"] = {
                "edits": args.edits, "seconds": seconds, "summary": line,
                "model_seconds": model, "requests": stats["requests"],
                "inputs": stats["inputs"], "fixed_seconds": seconds - model,
            }  # fmt: skip
            print(f"(c) backfill after {args.edits} edits: {seconds:.2f} s, model {model:.2f} s"
                  f" ({stats['requests']} requests, {stats['inputs']} inputs): fixed cost"
                  f" {seconds - model:.2f} s  {line}")  # fmt: skip

            results["tables"] = own_tables(engine)
            print(f"(e) the worker's tables: {results['tables']}")

            results["catch_up_seconds"] = catch_up_turn(env)
            print(f"(d) catch-up turn, all current: {results['catch_up_seconds']:.3f} s")
            engine.dispose()
        finally:
            if worker is not None and worker.poll() is None:
                os.killpg(worker.pid, 15)
                worker.wait(30)
            ollama.process.terminate()
            broker.stop()
            server.destroy()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "catalog_scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
