"""Connections to PostgreSQL cut mid-batch (failover, pooler restart, idle killer)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from devstack.fake_ollama import FakeOllama
from tests.backfills import call_backfill, embedded_ids, published_catalog, summaries
from tests.databases import APP_ROLE, TENANT_A, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until

FAILED_WRITE = re.compile(r"A batch of \d+ items of run \S+ failed while writing")


@pytest.fixture
def busy_worker(
    embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> Iterator[Process]:
    ollama.request_latency, ollama.input_latency = 0.0075, 0.0043
    process = start_worker(embedder_env, tmp_path / "worker.log")
    yield process
    process.kill()  # the test is over: its shutdown is not under test


def cut_worker_connections(db: Database) -> int:
    """What an operator's failover does: end every backend of the worker's role."""
    return int(
        db.scalar(  # type: ignore[arg-type]
            # With a timeout, each call returns once its backend is gone, its locks with it.
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE usename = :role",
            role=APP_ROLE,
        )
    )


def assert_run_closed_exactly(db: Database, worker: Process, skills: list[str]) -> None:
    wait_until(lambda: summaries(worker.log()), timeout=60, what="the summary")
    assert summaries(worker.log()) == [(len(skills), len(skills), 0)]
    assert embedded_ids(db) == set(skills)
    assert db.scalar("SELECT count(*) FROM skill_embeddings") == len(skills)
    assert db.scalar("SELECT count(*) FROM embedding_run_items WHERE outcome IS NULL") == 0
    assert "Traceback" not in worker.log()


@pytest.mark.slow
def test_connections_cut_between_ollamas_answer_and_the_write_lose_nothing(
    db: Database, busy_worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 320)
    gate = ollama.hold()
    call_backfill(embedder_env)

    cut = []
    for _ in range(5):
        # A batch has claimed its items and waits for its vectors: cut its transaction.
        gate.wait_held()
        cut.append(cut_worker_connections(db))
        gate.release()
        gate = ollama.hold()
    gate.release()

    assert cut[0] > 0
    assert_run_closed_exactly(db, busy_worker, skills)
    # The first cut, at least, landed on a batch between Ollama's answer and its write.
    assert FAILED_WRITE.search(busy_worker.log())


def waiting_on_locks(db: Database) -> list[str]:
    """The statements of the worker's backends that wait for a lock."""
    rows = db.rows(
        "SELECT query FROM pg_stat_activity WHERE usename = :role AND wait_event_type = 'Lock'",
        role=APP_ROLE,
    )
    return [str(row.query) for row in rows]


@pytest.mark.slow
def test_connections_cut_while_a_batch_records_and_while_one_claims_lose_nothing(
    db: Database, busy_worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 320)
    gate = ollama.hold()
    run_id = call_backfill(embedder_env)
    gate.wait_held()

    # Recording: a batch's last statements update its run's counts. Hold the run's row, let
    # the batch write, and cut while it waits to record.
    with db.admin.connect() as blocker:
        blocker.execute(
            sa.text("SELECT 1 FROM embedding_runs WHERE id = :id FOR UPDATE"), {"id": run_id}
        )
        gate.release()
        wait_until(
            lambda: any("UPDATE embedding_runs" in q for q in waiting_on_locks(db)),
            what="a batch waiting to record its outcomes",
        )
        gate = ollama.hold()
        assert cut_worker_connections(db) > 0
        blocker.rollback()

    # Claiming: a table lock granted once the batch in flight ends makes the next claims wait.
    gate.wait_held()
    blocker = db.admin.connect()
    locking = threading.Thread(
        target=blocker.execute,
        args=(sa.text("LOCK TABLE embedding_run_items IN EXCLUSIVE MODE"),),
    )
    locking.start()
    gate.release()
    try:
        wait_until(
            lambda: any("FOR UPDATE SKIP LOCKED" in q for q in waiting_on_locks(db)),
            what="a batch waiting to claim",
        )
        locking.join()
        assert cut_worker_connections(db) > 0
    finally:
        locking.join()
        blocker.rollback()
        blocker.close()

    assert_run_closed_exactly(db, busy_worker, skills)
    assert FAILED_WRITE.search(busy_worker.log())
    assert "Could not claim a batch of run" in busy_worker.log()


JOB_RECEIVED = re.compile(r"Task tasks\.embed_skill\[([0-9a-f-]+)\] received")
# A fan-out's retry, in its own line (Celery's `retry:` line would only repeat it, and is dropped).
FAN_OUT_RETRIED = re.compile(r"Fan-out of run \S+ paused: .*; retrying in ")


def queue_drained(redis_url: str) -> bool:
    """Nothing waits in the bulk lane and no worker holds a message (running or to retry)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return client.llen("embed_bulk") == 0 and client.hlen("unacked") == 0
    finally:
        client.close()


@pytest.mark.slow
def test_the_database_refusing_connections_mid_fan_out_queues_every_job_exactly_once(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    # Jobs outlast the outage; the backfill queues its jobs 100 at a time.
    env = {
        **embedder_env,
        "BACKFILL_CHUNK_SIZE": "100",
        "EMBED_MAX_RETRIES": "40",
        "EMBED_RETRY_BACKOFF_SECONDS": "0.2",
        "EMBED_RETRY_BACKOFF_MAX_SECONDS": "1",
    }
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 250)
    gate = ollama.hold()
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        run_id = call_backfill(env)
        # The first batch is with Ollama: the worker's first job waits for it, the rest of the
        # fan-out waits behind the first chunk's jobs.
        gate.wait_held()
        db.execute(f"ALTER ROLE {APP_ROLE} NOLOGIN")
        try:
            cut_worker_connections(db)
            gate.release()
            # The outage lasts until a fan-out chunk has met it and been put off for later.
            wait_until(
                lambda: FAN_OUT_RETRIED.search(worker.log()),
                timeout=60,
                what="a fan-out chunk to retry",
            )
        finally:
            db.execute(f"ALTER ROLE {APP_ROLE} LOGIN")
        wait_until(lambda: summaries(worker.log()), timeout=90, what="the summary")
        wait_until(
            lambda: db.scalar("SELECT fanned_out FROM embedding_runs WHERE id = :id", id=run_id),
            timeout=60,
            what="the run's fan-out to end",
        )
        wait_until(lambda: queue_drained(embedder_env["REDIS_URL"]), timeout=90,
                   what="every queued job to run")  # fmt: skip
    finally:
        worker.stop()

    assert len(set(JOB_RECEIVED.findall(worker.log()))) == len(skills)
    assert summaries(worker.log()) == [(250, 250, 0)]
    assert embedded_ids(db) == set(skills)
    assert "Traceback" not in worker.log()
