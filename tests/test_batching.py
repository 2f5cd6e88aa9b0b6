"""Backfills embed waiting jobs together; the app's jobs never wait for a batch."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.catalog import skill_text
from devstack.fake_ollama import FakeOllama
from tasks import enqueue_embed_skill
from tests.backfills import call_backfill, embedded_ids, published_catalog, summaries
from tests.databases import TENANT_A, TENANT_B, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until


@pytest.fixture
def batch_worker(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    process = start_worker({**embedder_env, "EMBED_BATCH_SIZE": "8"}, tmp_path / "worker.log")
    yield process
    process.kill()  # the test is over: its shutdown is not under test


@pytest.mark.slow
def test_a_backfill_sends_its_skills_in_batches(
    db: Database, batch_worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 40)

    call_backfill(embedder_env)

    wait_until(lambda: summaries(batch_worker.log()), what="the summary")
    assert summaries(batch_worker.log()) == [(40, 40, 0)]
    assert embedded_ids(db) == set(skills)
    assert ollama.inputs == 40
    assert max(ollama.batch_sizes) == 8
    assert ollama.requests <= math.ceil(40 / 8) + 1
    # Each skill still has its own job, which succeeds on its own, and its own progress line.
    wait_until(
        lambda: len(re.findall(r"tasks\.embed_skill\[\S+\] succeeded", batch_worker.log())) == 40,
        what="every skill's own job to succeed",
    )
    assert len(re.findall(r"\[\d+/40\] Embedded: ", batch_worker.log())) == 40


@pytest.mark.slow
def test_a_rejected_batch_is_split_so_only_the_bad_input_fails(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 4)
    worker = start_worker({**embedder_env, "EMBED_BATCH_SIZE": "4"}, tmp_path / "worker.log")
    try:
        # The batch of 4, then its first half, then its first skill: Ollama refuses each.
        ollama.fail_next(3, 400, "the input length exceeds the context length")
        call_backfill(embedder_env)
        wait_until(lambda: summaries(worker.log()), what="the summary")
    finally:
        worker.stop()

    assert summaries(worker.log()) == [(3, 4, 1)]
    # Jobs are queued in id order: the first one leads the batch and is the one refused.
    assert embedded_ids(db) == set(sorted(skills)[1:])
    assert ollama.batch_sizes == [1, 2]  # the successful calls: skill 2, then skills 3 and 4
    assert "refused the input (400: the input length exceeds" in worker.log()
    assert "Retrying" not in worker.log()


@pytest.mark.slow
def test_malformed_answers_to_a_batch_are_retried_and_fail_no_skill(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 24)
    env = {**embedder_env, "EMBED_BATCH_SIZE": "8", "EMBED_MAX_RETRIES": "8"}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        # Enough bad answers to halve a batch of 8 down to one skill, were they blamed on it.
        ollama.corrupt_next(2, "count")
        ollama.proxy_page_next(2)
        call_backfill(env)
        wait_until(lambda: summaries(worker.log()), what="the summary")
        log = worker.log()  # before the stop, which may cut a job still retrying short
    finally:
        worker.stop()

    assert summaries(log) == [(24, 24, 0)]
    assert embedded_ids(db) == set(skills)
    assert "returned 7 vectors for 8 inputs" in log
    assert "answered 200 with text/html, not JSON" in log
    assert "Failed" not in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_publish_during_a_long_backfill_is_embedded_before_it_ends(
    db: Database, batch_worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skills = sorted(published_catalog(db, 240))
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    texts = {str(r.id): skill_text(str(r.name), str(r.description))
             for r in db.rows("SELECT id, name, description FROM skills")}  # fmt: skip
    # Batches go in skill id order, 8 a batch: the third is held while the app publishes, so
    # 27 of the run's 30 batches are still to come.
    gate = ollama.hold(match=names[skills[16]])
    try:
        call_backfill(embedder_env)
        gate.wait_held()
        urgent = db.add_skill(TENANT_A, "Urgent new skill", "Published while the backfill runs")
        assert enqueue_embed_skill(urgent, TENANT_A, broker_url=embedder_env["REDIS_URL"])
    finally:
        gate.release()

    wait_until(lambda: summaries(batch_worker.log()), timeout=60, what="the summary")
    # The run counts the catalog at its end: the skill published meanwhile is in it, current.
    assert summaries(batch_worker.log()) == [(241, 241, 0)]
    wait_until(lambda: urgent in embedded_ids(db), what="the publish's row")
    sent = ollama.texts
    urgent_text = skill_text("Urgent new skill", "Published while the backfill runs")
    # Ollama saw the publish before the backfill's last batch: it did not wait behind the run.
    assert sent.index(urgent_text) < sent.index(texts[skills[-1]])


@pytest.mark.slow
def test_a_backfill_queues_its_jobs_a_chunk_at_a_time(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    env = {**embedder_env, "BACKFILL_CHUNK_SIZE": "25", "EMBED_BATCH_SIZE": "8"}
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    skills = published_catalog(db, 60) + published_catalog(db, 45, tenant=TENANT_B)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        call_backfill(env)
        wait_until(lambda: summaries(worker.log()), timeout=60, what="the summary")
        wait_until(
            lambda: len(re.findall(r"tasks\.embed_skill\[\S+\] succeeded", worker.log())) == 105,
            what="every skill's own job",
        )
    finally:
        worker.stop()

    assert summaries(worker.log()) == [(105, 105, 0)]
    assert embedded_ids(db) == set(skills)
    # 105 jobs in chunks of 25: the backfill queues the first, four fan-out steps the rest.
    assert len(re.findall(r"tasks\.fan_out\[\S+\] succeeded", worker.log())) == 4
    assert ollama.inputs == 105
