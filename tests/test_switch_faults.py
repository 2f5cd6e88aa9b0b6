"""A model switch through failures: a connection cut mid-swap, a worker killed mid-staging."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from devstack.fake_ollama import FakeOllama
from tests.backfills import published_catalog
from tests.databases import TENANT_A, Database
from tests.processes import Process, start_worker
from tests.test_switch import (
    NEW,
    SWAPPED,
    Sampler,
    assert_new_vectors_of_current_text,
    backfilled,
    cli,
    live_models,
    models,  # noqa: F401 (autouse: the fake Ollama serves the new model)
    staged_summaries,
    tenant_model,
)
from tests.waiting import wait_until


def swapping_backend(db: Database) -> int | None:
    """The worker's backend whose swap waits on the staged row held by the test."""
    pid = db.scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'everyskill-embedder'"
        " AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM staged_embeddings WHERE"
        " tenant_id%'"
    )
    return None if pid is None else int(str(pid))


@pytest.mark.slow
def test_a_connection_cut_during_the_swap_rolls_it_back_and_it_swaps_once(
    db: Database, own_worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    worker = own_worker  # its connections are cut: not the shared worker
    skills = sorted(backfilled(db, worker, embedder_env, 200))
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    sampler = Sampler(db)
    gate = ollama.hold(match=names[skills[100]])
    admin = db.admin.connect()
    try:
        started = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", NEW)
        assert started.returncode == 0, started.stderr
        gate.wait_held()
        # Hold the swap mid-transaction on a staged row it must delete, as above.
        transaction = admin.begin()
        admin.execute(
            sa.text("SELECT 1 FROM staged_embeddings WHERE skill_id = :s FOR UPDATE"),
            {"s": skills[0]},
        )
        gate.release()
        first = wait_until(lambda: swapping_backend(db), timeout=120, what="the swap to wait")
        for _ in range(5):
            assert sampler.sample("swap") == {"nomic-embed-text": 200}
        # A failover: the swapping backend ends, its uncommitted transaction with it.
        assert db.scalar("SELECT pg_terminate_backend(:pid, 5000)", pid=first) is True
        wait_until(lambda: "was rolled back" in worker.log(), what="the rolled back line")
        for _ in range(5):
            assert sampler.sample("rolled back") == {"nomic-embed-text": 200}
        # The retry reaches the same lock on a fresh connection, then goes through.
        second = wait_until(lambda: swapping_backend(db), timeout=30, what="the retried swap")
        assert second != first
        transaction.rollback()
        wait_until(lambda: SWAPPED in worker.log(), what="the swap's line")
        for _ in range(5):
            assert sampler.sample("after") == {NEW: 200}
    finally:
        gate.release()
        admin.close()

    log = worker.log()
    assert all(len(seen) == 1 for _, seen in sampler.samples)
    assert sampler.phases() == {"swap": 5, "rolled back": 5, "after": 5}
    rolled_back = [line for line in log.splitlines() if "was rolled back" in line]
    assert len(rolled_back) == 1, rolled_back
    assert f"The swap of tenant {TENANT_A} to {NEW} was rolled back (" in rolled_back[0]
    assert rolled_back[0].endswith("): trying again")
    assert log.count(SWAPPED) == 1
    assert "Could not settle" not in log
    assert "Traceback" not in log
    assert tenant_model(db) == (NEW, 768)
    assert live_models(db) == {NEW: 200}
    assert db.scalar("SELECT count(*) FROM staged_embeddings") == 0
    assert db.scalar("SELECT count(*) FROM embedding_switches") == 0
    assert_new_vectors_of_current_text(db)


@pytest.mark.slow
def test_a_worker_killed_mid_staging_is_finished_by_another_and_swaps_once(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = sorted(published_catalog(db, 192))
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    ollama.request_latency = 0.02
    # A short request timeout: the dead worker's Ollama slot frees itself sooner.
    env = {**embedder_env, "OLLAMA_TIMEOUT_SECONDS": "1"}
    gate = ollama.hold(match=names[skills[128]])
    first = start_worker(env, tmp_path / "first.log", "first")
    try:
        started = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", NEW)
        assert started.returncode == 0, started.stderr
        gate.wait_held()
        staged_before = db.scalar("SELECT count(*) FROM staged_embeddings")
    finally:
        first.kill()
        gate.release()
    assert 0 < int(str(staged_before)) < 192

    second = start_worker(env, tmp_path / "second.log", "second")
    try:
        wait_until(lambda: SWAPPED in second.log(), timeout=90, what="the swap")
    finally:
        second.stop()

    logs = first.log() + second.log()
    assert staged_summaries(logs) == [(192, 192, NEW, 0)]
    assert logs.count(SWAPPED) == 1
    assert live_models(db) == {NEW: 192}
    assert tenant_model(db) == (NEW, 768)
    assert db.scalar("SELECT count(*) FROM staged_embeddings") == 0
