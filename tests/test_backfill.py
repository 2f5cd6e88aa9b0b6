"""`tasks.backfill` and `tasks.reconcile`: the operator's side, faults included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from db.catalog import input_hash, skill_text
from devstack.fake_ollama import FakeOllama
from devstack.redis import LocalRedis
from tests.backfills import call_backfill, embedded_ids, published_catalog, summaries
from tests.databases import TENANT_A, TENANT_B, Database
from tests.processes import Process, celery, start_worker
from tests.waiting import wait_until

TENANT_C = "tenant-cccc-0000-0000-000000000003"  # semantic similarity off
TENANT_D = "tenant-dddd-0000-0000-000000000004"  # inactive


def test_backfill_embeds_exactly_the_published_skills_of_enabled_tenants(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    db.add_tenant(TENANT_C, enabled=False)
    db.add_tenant(TENANT_D, active=False)
    long_description = "Step by step runbook for a database failover. " * 250
    expected = {
        db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes"),
        db.add_skill(TENANT_A, "Übersetzung ins Deutsche", "Technische Texte übersetzen"),
        db.add_skill(TENANT_A, "丁寧な返信 🚀", "Polite Japanese replies"),
        db.add_skill(TENANT_A, "Suggest icon metaphors", ""),
        db.add_skill(TENANT_A, "Failover runbook", long_description),
        db.add_skill(TENANT_B, "Summarise meeting notes", "Decisions and owners"),
        db.add_skill(TENANT_B, "Forecast revenue", "From the pipeline"),
    }
    for status in ("draft", "pending_review", "ai_reviewed", "approved", "rejected"):
        db.add_skill(TENANT_A, f"A {status} skill", "Not yet public", status=status)
    db.add_skill(TENANT_B, "Changes requested", "Not yet public", status="changes_requested")
    db.add_skill(TENANT_C, "Tenant with search off", "Published but disabled")
    db.add_skill(TENANT_D, "Inactive tenant's skill", "Published but inactive")

    call_backfill(embedder_env)

    wait_until(lambda: summaries(worker.log()), what="the summary line")
    assert summaries(worker.log()) == [(7, 7, 0)]
    assert embedded_ids(db) == expected
    assert ollama.inputs == 7
    rows = db.rows(
        "SELECT e.input_hash, e.tenant_id, s.name, s.description, s.tenant_id AS skill_tenant"
        " FROM skill_embeddings e JOIN skills s ON s.id = e.skill_id"
    )
    for row in rows:
        assert row.input_hash == input_hash(skill_text(row.name, row.description))
        assert row.tenant_id == row.skill_tenant
    assert len(re.findall(r"\[\d+/7\] Embedded: ", worker.log())) == 7


def test_a_second_backfill_on_an_unchanged_catalog_sends_nothing(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    published_catalog(db, 12)
    call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the first summary")
    before = ollama.inputs

    call_backfill(embedder_env)

    wait_until(lambda: len(summaries(worker.log())) == 2, what="the second summary")
    assert summaries(worker.log()) == [(12, 12, 0), (12, 12, 0)]
    assert ollama.inputs == before


def test_force_re_embeds_every_skill(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    published_catalog(db, 5)
    call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the first summary")

    call_backfill(embedder_env, "--kwargs", '{"force": true}')

    wait_until(lambda: len(summaries(worker.log())) == 2, what="the second summary")
    assert ollama.inputs == 10


def test_a_skill_edited_since_the_last_backfill_is_the_only_one_sent(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 6)
    call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the first summary")
    ollama.reset()

    db.edit_skill(skills[2], description="A sharper description")
    call_backfill(embedder_env)

    wait_until(lambda: len(summaries(worker.log())) == 2, what="the second summary")
    assert ollama.texts == [skill_text("Catalog skill 0002", "A sharper description")]


@pytest.mark.parametrize(
    ("arrange", "expected"),
    [
        (lambda o: o.down(), "Backfill refused: cannot reach Ollama"),
        (lambda o: setattr(o, "models", set()), "run `ollama pull nomic-embed-text`"),
        (lambda o: setattr(o, "dimensions", 1024), "makes 1024-dimension vectors but 768"),
    ],
    ids=["ollama-down", "model-missing", "dimension-mismatch"],
)
def test_backfill_refuses_with_one_line_when_ollama_is_not_ready(
    db: Database,
    worker: Process,
    embedder_env: dict[str, str],
    ollama: FakeOllama,
    arrange: object,
    expected: str,
) -> None:
    db.add_tenant(TENANT_A)
    published_catalog(db, 3)
    arrange(ollama)  # type: ignore[operator]

    result = subprocess.run(
        [sys.executable, "-m", "worker", "backfill", "--wait", "--timeout", "30"],
        env=embedder_env,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 1
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert db.scalar("SELECT count(*) FROM embedding_run_items") == 0
    assert "Traceback" not in worker.log()


def test_backfill_wait_shows_progress_and_the_summary(
    db: Database, worker: Process, embedder_env: dict[str, str]
) -> None:
    db.add_tenant(TENANT_A)
    published_catalog(db, 8)

    result = subprocess.run(
        [sys.executable, "-m", "worker", "backfill", "--wait", "--timeout", "60"],
        env=embedder_env,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    assert "8/8" in result.stdout
    assert result.stdout.strip().endswith("Done. Embedded 8/8 skills. 0 failures.")


def test_status_shows_coverage_per_tenant_and_the_run(
    db: Database, worker: Process, embedder_env: dict[str, str]
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B, enabled=False)
    skills = published_catalog(db, 4)
    published_catalog(db, 2, TENANT_B)
    call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the summary")
    db.edit_skill(skills[0], description="Changed after the backfill")
    db.add_skill(TENANT_A, "Published after the backfill", "Not embedded yet")

    result = subprocess.run(
        [sys.executable, "-m", "worker", "status"],
        env={**embedder_env, "COLUMNS": "160"},
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    cells_a = [cell.strip() for cell in lines[TENANT_A].split("│")[1:-1]]
    cells_b = [cell.strip() for cell in lines[TENANT_B].split("│")[1:-1]]
    assert cells_a == [TENANT_A, "on", "nomic-embed-text", "5", "3", "1", "1"]
    assert cells_b == [TENANT_B, "off", "nomic-embed-text", "2", "0", "0", "2"]
    assert "Done. Embedded 4/4 skills. 0 failures." in result.stdout


@pytest.mark.slow
def test_a_worker_killed_mid_backfill_closes_its_run_soon_after_a_new_worker_starts(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    # Production settings: the dead worker's messages stay out of reach for an hour.
    assert "BROKER_VISIBILITY_TIMEOUT_SECONDS" not in embedder_env
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 192)
    ollama.request_latency = 0.02
    # A short request timeout: the dead worker's Ollama slot frees itself sooner.
    env = {**embedder_env, "OLLAMA_TIMEOUT_SECONDS": "1"}
    # Runs go in skill id order, 32 a batch: hold the fifth batch, so the worker dies with
    # batches written before it and the rest of the run (and its held messages) not done.
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    gate = ollama.hold(match=names[sorted(skills)[128]])
    first = start_worker(env, tmp_path / "first.log", "first")
    try:
        call_backfill(embedder_env)
        gate.wait_held()
    finally:
        first.kill()
        gate.release()
    written = len(embedded_ids(db))
    assert 96 <= written < 192

    second = start_worker(env, tmp_path / "second.log", "second")
    try:
        wait_until(lambda: summaries(second.log()), timeout=60, what="the summary")
    finally:
        second.stop()

    assert summaries(first.log() + second.log()) == [(192, 192, 0)]
    assert embedded_ids(db) == set(skills)
    assert db.scalar("SELECT count(*) FROM skill_embeddings") == 192


@pytest.fixture
def beat(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    env = {**embedder_env, "RECONCILE_INTERVAL_SECONDS": "1"}
    process = Process(
        celery("beat", "--loglevel=INFO", f"--schedule={tmp_path / 'beat-schedule'}"),
        env,
        tmp_path / "beat.log",
    ).start(ready="beat: Starting")
    yield process
    process.kill()  # the test is over: its shutdown is not under test


def test_a_backfill_delivered_again_resumes_its_run_instead_of_starting_another(
    db: Database, worker: Process, redis_url: str
) -> None:
    # What Redis does with the backfill's message when a worker dies while fanning it out.
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 30)
    producer = Celery("test", broker=redis_url, set_as_current=False)
    run_id = str(uuid.uuid4())
    for _ in range(2):
        producer.send_task("tasks.backfill", task_id=run_id, queue="embed")
    producer.close()

    wait_until(lambda: worker.log().count(f"tasks.backfill[{run_id}] succeeded") == 2,
               what="both deliveries")  # fmt: skip
    wait_until(lambda: summaries(worker.log()), what="the summary")
    assert embedded_ids(db) == set(skills)
    assert summaries(worker.log()) == [(30, 30, 0)]
    assert db.scalar("SELECT count(*) FROM embedding_runs") == 1
    assert "Traceback" not in worker.log()


@pytest.mark.slow
def test_redis_restarted_empty_mid_backfill_is_healed_by_reconcile(
    db: Database,
    embedder_env: dict[str, str],
    ollama: FakeOllama,
    redis_server: LocalRedis,
    tmp_path: Path,
) -> None:
    # One skill a batch: most of the run is still only messages when Redis loses them.
    env = {**embedder_env, "EMBED_BATCH_SIZE": "1", "RECONCILE_INTERVAL_SECONDS": "2"}
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    skills = sorted(published_catalog(db, 80))
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    # The ninth skill's request is held while Redis restarts: at most eight rows are written.
    gate = ollama.hold(match=names[skills[8]])
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        call_backfill(env, "--kwargs", json.dumps({"tenant_id": TENANT_A}))
        gate.wait_held()
        redis_server.restart_empty()
        lost = 80 - len(embedded_ids(db))
        # Published meanwhile in a tenant the run does not cover, its job lost with the queue:
        # only a reconcile finds it.
        late = db.add_skill(TENANT_B, "Published while Redis was away", "Its job was lost")
        gate.release()
        beat = Process(
            celery("beat", "--loglevel=INFO", f"--schedule={tmp_path / 'beat-schedule'}"),
            env,
            tmp_path / "beat.log",
        ).start()
        try:
            wait_until(lambda: summaries(worker.log()), timeout=90, what="the summary")
            wait_until(lambda: late in embedded_ids(db), timeout=60, what="the reconcile")
        finally:
            beat.stop()
    finally:
        gate.release()
        worker.stop()

    assert lost >= 72
    assert embedded_ids(db) == {*skills, late}
    assert summaries(worker.log()) == [(80, 80, 0)]
    assert "Reconcile:" in worker.log()


@pytest.mark.slow
def test_ollama_down_for_a_while_is_outlasted_by_retries(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    env = {
        **embedder_env,
        "EMBED_MAX_RETRIES": "12",
        "EMBED_RETRY_BACKOFF_SECONDS": "0.2",
        "EMBED_RETRY_BACKOFF_MAX_SECONDS": "1",
    }
    db.add_tenant(TENANT_A)
    skills = sorted(published_catalog(db, 100))
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    # 32 a batch: the second batch is with Ollama when it goes down, the first is written.
    gate = ollama.hold(match=names[skills[40]])
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        call_backfill(env)
        gate.wait_held()
        ollama.down()
        gate.release()
        # Down for a while: long enough for jobs to fail and retry, again and again.
        wait_until(lambda: worker.log().count("Retrying") >= 5, timeout=60, what="retries")
        ollama.up()
        wait_until(lambda: summaries(worker.log()), timeout=60, what="the summary")
    finally:
        gate.release()
        worker.stop()

    assert embedded_ids(db) == set(skills)
    assert summaries(worker.log()) == [(100, 100, 0)]


def test_reconcile_removes_rows_of_unpublished_skills_and_queues_missing_ones(
    db: Database, worker: Process, embedder_env: dict[str, str]
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 3)
    call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the summary")
    db.edit_skill(skills[0], status="rejected")
    missing = db.add_skill(TENANT_A, "Published while Redis was away", "No job was queued")

    result = subprocess.run(
        celery("call", "tasks.reconcile"), env=embedder_env, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    wait_until(lambda: embedded_ids(db) == {skills[1], skills[2], missing}, what="the heal")
