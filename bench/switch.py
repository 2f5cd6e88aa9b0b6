"""A model switch against a backfill, and the swap transaction.

`python -m bench.switch` runs, on one throwaway PostgreSQL, Redis and fake Ollama, with a real
worker:

  (a) a backfill of --skills skills at the CPU model's cost, then a switch of the same tenant
      to another model of the same cost: skills/s of each, from queuing to the run's summary;
  (b) for each of --swap-sizes: a catalog backfilled and staged at zero model cost, then the
      swap's transaction (the worker's own "in X s"), and an app job for that tenant queued
      while the swap runs: its time to a current row of the new model, and whether it failed.

Results print as a table and go to bench/results/switch.json.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery

from bench.throughput import TENANT, backfill_through_worker, psycopg_url, seed_catalog
from db import migrate
from db.session import make_engine
from devstack.fake_ollama import FakeOllama
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks.producer import enqueue_embed_skill
from tasks.queues import INTERACTIVE

RESULTS = Path(__file__).parent / "results"
MODELS = ("nomic-embed-text", "embeddinggemma")
SWAPPED = re.compile(r"Swapped tenant \S+ from \S+ to \S+ .* in ([\d.]+) s")


def switch(engine: sa.Engine, redis_url: str, model: str, log: Path) -> dict[str, float]:
    """Queue tasks.switch_model; time its staging run and wait for its swap."""
    app = Celery("bench", broker=redis_url, set_as_current=False)
    swaps_before = len(SWAPPED.findall(log.read_text()))
    started = time.perf_counter()
    app.send_task("tasks.switch_model", kwargs={"model": model, "tenant_id": TENANT},
                  queue=INTERACTIVE)  # fmt: skip
    staged, total = None, 0
    with engine.connect() as connection:
        while staged is None:
            row = connection.execute(
                sa.text(
                    "SELECT total, failed, finished_at FROM embedding_runs WHERE kind = 'switch'"
                    " ORDER BY started_at DESC LIMIT 1"
                )
            ).one_or_none()
            connection.commit()
            if row is not None and row.finished_at is not None:
                staged, total = time.perf_counter() - started, int(row.total)
            time.sleep(0.002)
    while len(found := SWAPPED.findall(log.read_text())) == swaps_before:
        time.sleep(0.05)
    app.close()
    return {"total": float(total), "staging_s": staged, "swap_s": float(found[-1])}


def app_job_during_swap(engine: sa.Engine, redis_url: str, model: str) -> dict[str, Any]:
    """Once the swap's INSERT runs: edit a skill and queue its job as the app does; time it."""
    with engine.connect() as connection:
        while not connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query LIKE 'INSERT INTO skill_embeddings (id, tenant_id, skill_id,%'"
                " AND state = 'active'"
            )
        ).scalar():
            connection.commit()
            time.sleep(0.001)
        skill = connection.execute(
            sa.text("SELECT id FROM skills WHERE status = 'published' ORDER BY id LIMIT 1")
        ).scalar_one()
        connection.execute(
            sa.text("UPDATE skills SET description = 'Edited during the swap' WHERE id = :id"),
            {"id": skill},
        )
        connection.commit()
        queued = time.perf_counter()
        enqueue_embed_skill(skill, TENANT, broker_url=redis_url)
        while True:
            row = connection.execute(
                sa.text(
                    "SELECT model_name, input_hash = encode(sha256(convert_to(s.name || ' ' ||"
                    " s.description, 'UTF8')), 'hex') AS current FROM skill_embeddings e"
                    " JOIN skills s ON s.id = e.skill_id WHERE e.skill_id = :id"
                ),
                {"id": skill},
            ).one()
            connection.commit()
            if row.model_name == model and row.current:
                return {"seconds": time.perf_counter() - queued, "skill": skill}
            time.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.switch", description=__doc__)
    parser.add_argument("--skills", type=int, default=1000)
    parser.add_argument("--swap-sizes", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-switch-"))
    pg = LocalPostgres(work / "pg", durable=False).start()
    redis = LocalRedis().start()
    ollama = FakeOllama(models=MODELS).start()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    worker: subprocess.Popen[bytes] | None = None
    log_path = work / "worker.log"
    try:
        engine = make_engine(psycopg_url(pg.url()))
        migrate.upgrade(engine)
        env = {**os.environ, "DATABASE_URL": pg.url(), "REDIS_URL": redis.url,
               "OLLAMA_URL": ollama.url}  # fmt: skip
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        while "ready." not in log_path.read_text():
            time.sleep(0.1)
        for index, (skills, cost) in enumerate(
            [(args.skills, (args.request_ms, args.input_ms))]
            + [(n, (0.0, 0.0)) for n in args.swap_sizes]
        ):
            ollama.request_latency, ollama.input_latency = cost[0] / 1000, cost[1] / 1000
            seed_catalog(engine, skills, ollama.url)
            with engine.begin() as connection:
                connection.execute(
                    sa.text("UPDATE site_settings SET ollama_model = :m"), {"m": MODELS[0]}
                )
            backfill = backfill_through_worker(engine, redis.url)
            print(f"backfill of {skills} skills: {backfill.summary:.2f} s", flush=True)
            if index == 0:
                staged = switch(engine, redis.url, MODELS[1], log_path)
                results["rate"] = {
                    "skills": skills,
                    "backfill_per_s": backfill.total / backfill.summary,
                    "staging_per_s": staged["total"] / staged["staging_s"],
                }
                results["rate"]["ratio"] = (
                    results["rate"]["staging_per_s"] / results["rate"]["backfill_per_s"]
                )
                print(results["rate"], flush=True)
                continue
            with ThreadPoolExecutor(1) as pool:
                job = pool.submit(app_job_during_swap, engine, redis.url, MODELS[1])
                staged = switch(engine, redis.url, MODELS[1], log_path)
                seen = job.result(timeout=600)
            # That job's own failure: the log's other lines are the catch-up's jobs for skills
            # the previous size's catalog had (this bench replaces the catalog between sizes).
            failed = bool(re.search(rf"Failed[^:]*: {seen['skill']}", log_path.read_text()))
            results[f"swap_{skills}"] = {**staged, "app_job_s": seen["seconds"],
                                         "app_job_failed": failed}  # fmt: skip
            print(results[f"swap_{skills}"], flush=True)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        ollama.stop()
        redis.stop()
        pg.destroy()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "switch.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
