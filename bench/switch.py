"""How fast does a model switch stage against a backfill, and how long does its swap hold?

`python -m bench.switch` runs, on one throwaway stack, a fake Ollama in its own process and a
real worker:

  (a) a backfill of --skills skills at the CPU model's cost, then a switch of the same tenant
      to another model of the same cost: skills/s of each, from queuing to the run's summary;
  (b) for each of --swap-sizes: a catalog backfilled and staged at zero model cost, then the
      swap's transaction (the worker's own "in X s"), and an app job for that tenant queued
      while the swap runs: its time to a current row of the new model, and whether it failed.
"""

from __future__ import annotations

import argparse
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery

from bench.harness import Results, console
from bench.harness import backfill as timed_backfill
from devstack import seed
from devstack.seed import TENANT
from devstack.stack import stack
from tasks import INTERACTIVE, enqueue_embed_skill

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
    results = Results("switch", skills=args.skills, swap_sizes=args.swap_sizes,
                      cost_model_ms=[args.request_ms, args.input_ms])  # fmt: skip
    with stack(prefix="bench-switch-") as s:
        ollama = s.fake(models=MODELS)
        env = s.env(ollama.url)
        worker = s.worker(env, loglevel="INFO")
        log_path = worker.log_path
        for index, (skills, cost) in enumerate(
            [(args.skills, (args.request_ms, args.input_ms))]
            + [(n, (0.0, 0.0)) for n in args.swap_sizes]
        ):
            ollama.configure(request_latency=cost[0] / 1000, input_latency=cost[1] / 1000)
            seed.clear(s.engine)
            seed.add_tenants(s.engine, ollama_url=ollama.url)
            seed.seed_catalog(s.engine, skills)
            with s.engine.begin() as connection:
                connection.execute(
                    sa.text("UPDATE site_settings SET ollama_model = :m"), {"m": MODELS[0]}
                )
            backfill = timed_backfill(s.engine, env, command=False)
            console.print(f"backfill of {skills} skills: {backfill.summary_s:.2f} s")
            if index == 0:
                staged = switch(s.engine, s.redis_url, MODELS[1], log_path)
                backfill_rate = backfill.total / backfill.summary_s
                staging_rate = staged["total"] / staged["staging_s"]
                results.add(f"backfill, {skills:,} skills, CPU model", backfill_rate, "skills/s")
                results.add(f"staging of a switch, {skills:,} skills, same cost", staging_rate,
                            "skills/s")  # fmt: skip
                results.add("staging / backfill", staging_rate / backfill_rate, "x",
                            target=">= 0.9x")  # fmt: skip
                continue
            with ThreadPoolExecutor(1) as pool:
                job = pool.submit(app_job_during_swap, s.engine, s.redis_url, MODELS[1])
                staged = switch(s.engine, s.redis_url, MODELS[1], log_path)
                seen = job.result(timeout=600)
            # That job's own failure: the log's other lines are the catch-up's jobs for skills
            # the previous size's catalog had (this bench replaces the catalog between sizes).
            failed = bool(re.search(rf"Failed[^:]*: {seen['skill']}", log_path.read_text()))
            results.add(f"swap, {skills:,} skills", staged["swap_s"], "s",
                        target="<= 30 s" if skills >= 10_000 else None)  # fmt: skip
            results.add(f"swap, {skills:,} skills: its staging", staged["staging_s"], "s")
            results.add(f"swap, {skills:,} skills: app job queued during it, to a current row"
                        " of the new model", seen["seconds"], "s")  # fmt: skip
            results.add(f"swap, {skills:,} skills: that app job failed", int(failed), "(0 = no)",
                        target="0")  # fmt: skip
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
