"""Backfills meeting each other and a catalog that changes under a run, on real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from devstack.fake_ollama import FakeOllama
from tasks.queues import INTERACTIVE
from tests.databases import TENANT_A, Database
from tests.processes import Process, celery
from tests.test_backfill import embedded_ids, published_catalog, summaries
from tests.waiting import wait_until


def all_logs(workers: list[Process]) -> str:
    return "\n".join(worker.log() for worker in workers)


def backfill_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", "backfill", *args]


def test_two_backfills_started_together_send_each_skill_to_ollama_once(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 120)
    env = {**embedder_env, "EMBED_BATCH_SIZE": "8"}
    # Ollama holds every batch: the first run is still open whatever the second one does.
    gate = ollama.hold()
    # A script and an operator: both backfills are queued before any worker takes one, so the
    # two workers start them side by side.
    queued = subprocess.run(backfill_command(), env=env, capture_output=True, text=True)
    assert queued.returncode == 0, queued.stderr
    waiting = subprocess.Popen(
        backfill_command("--wait", "--timeout", "120"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    broker = redis.Redis.from_url(env["REDIS_URL"])
    wait_until(lambda: broker.llen(INTERACTIVE) == 2, what="both backfills to be queued")
    workers = [
        Process(
            celery("worker", "--loglevel=INFO", f"--hostname=w{i}@%h", "--without-mingle",
                   "--without-gossip"),
            env, tmp_path / f"w{i}.log",
        ).start()
        for i in range(2)
    ]  # fmt: skip
    try:
        for worker in workers:
            worker.wait_for(lambda log: "ready." in log, 60, "the worker to be ready")
        wait_until(lambda: "joins backfill" in all_logs(workers), what="the second to join")
        gate.release()
        out, err = waiting.communicate(timeout=120)
        wait_until(lambda: summaries(all_logs(workers)), what="the summary")
    finally:
        gate.release()
        waiting.kill()
        for worker in workers:
            worker.stop()

    logs = all_logs(workers)
    assert summaries(logs) == [(120, 120, 0)]
    assert len([line for line in logs.splitlines() if "joins backfill" in line]) == 1
    assert embedded_ids(db) == set(skills)
    texts = ollama.texts
    assert len(texts) == len(set(texts)) == 120
    assert waiting.returncode == 0, err
    assert out.strip().endswith("Done. Embedded 120/120 skills. 0 failures.")
