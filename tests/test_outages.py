"""Redis (the broker) stopping under a working deployment: what is lost, what is caught."""

from __future__ import annotations

from pathlib import Path

import redis

from devstack.fake_ollama import FakeOllama
from devstack.redis import LocalRedis
from tasks import enqueue_embed_skill
from tasks.text import input_hash, skill_text
from tests.databases import TENANT_A, Database
from tests.processes import start_worker
from tests.test_backfill import call_backfill, embedded_ids, published_catalog, summaries
from tests.waiting import wait_until
from worker.catch_up import CatchUp


def stored_hash(db: Database, skill_id: str) -> object:
    return db.scalar("SELECT input_hash FROM skill_embeddings WHERE skill_id = :id", id=skill_id)


def test_an_edit_refused_during_a_broker_outage_is_embedded_without_beat(
    db: Database,
    embedder_env: dict[str, str],
    ollama: FakeOllama,
    redis_server: LocalRedis,
    tmp_path: Path,
) -> None:
    env = {**embedder_env, "CATCH_UP_INTERVAL_SECONDS": "1"}
    redis_url = env["REDIS_URL"]
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        assert enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
        wait_until(lambda: stored_hash(db, skill), what="the first embedding")

        redis_server.stop()
        db.edit_skill(skill, description="Flag risky changes and missing tests")
        refused = enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
        redis_server.start()

        edited = input_hash(
            skill_text("Review pull requests", "Flag risky changes and missing tests")
        )
        wait_until(lambda: stored_hash(db, skill) == edited, timeout=30, what="the edit embedded")
    finally:
        worker.stop()

    assert refused is False
    assert ollama.inputs == 2


def test_redis_stopped_mid_batch_writes_its_vectors_and_logs_no_traceback(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    # A Redis that keeps its data, as a deployment's does: its queue is there when it is back.
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    env = {**embedder_env, "REDIS_URL": server.url, "RECOVERY_INTERVAL_SECONDS": "2"}
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 200)
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    held = sorted(skills)[70]  # in the third batch of the run (skill id order, 32 a batch)
    gate = ollama.hold(match=names[held])
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        run_id = call_backfill(env)
        gate.wait_held()
        wait_until(
            lambda: db.scalar("SELECT fanned_out FROM embedding_runs WHERE id = :id", id=run_id),
            what="every job queued",
        )
        server.stop()
        gate.release()
        wait_until(lambda: held in embedded_ids(db), what="the held batch's vectors written")
        server.start()
        wait_until(lambda: summaries(worker.log()), timeout=90, what="the summary")
        log = worker.log()
    finally:
        worker.stop()
        server.stop()

    assert summaries(log) == [(200, 200, 0)]
    assert embedded_ids(db) == set(skills)
    assert ollama.inputs == 200  # no input sent twice
    assert "Traceback" not in log
    assert "CPendingDeprecationWarning" not in log
    # One line a problem: every record since the worker was ready fits on its line.
    running = log.split(" ready.", 1)[1].splitlines()[1:]
    assert [line for line in running if not line.startswith("[")] == []


def test_one_worker_of_the_deployment_catches_up_at_a_time(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    runs: list[str] = []
    first = CatchUp(client, lambda: runs.append("first"), interval=30)
    second = CatchUp(client, lambda: runs.append("second"), interval=30)
    try:
        assert first.tick()
        assert not second.tick()
        assert not first.tick()  # its turn lasts the interval, not only the reconcile
    finally:
        client.close()

    assert runs == ["first"]
