"""What a run keeps: the items it sent, not one row per skill of the catalog, and not forever."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from devstack.fake_ollama import FakeOllama
from tests.backfills import (
    call_backfill,
    embedded_ids,
    published_catalog,
    status_json,
    summaries,
)
from tests.databases import TENANT_A, Database
from tests.processes import Process, celery, start_worker
from tests.waiting import wait_until


def run_items(db: Database, run_id: str) -> set[str]:
    rows = db.rows("SELECT skill_id FROM embedding_run_items WHERE run_id = :id", id=run_id)
    return {str(row.skill_id) for row in rows}


def test_a_backfill_records_only_the_skills_it_sends(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 12)
    first = call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the first summary")

    unchanged = call_backfill(embedder_env)
    wait_until(lambda: len(summaries(worker.log())) == 2, what="the second summary")
    for skill in skills[3:5]:
        db.edit_skill(skill, description=f"Sharper: {skill}")
    edited = call_backfill(embedder_env)
    wait_until(lambda: len(summaries(worker.log())) == 3, what="the third summary")

    assert summaries(worker.log()) == [(12, 12, 0)] * 3
    assert run_items(db, first) == set(skills)
    assert run_items(db, unchanged) == set()
    assert run_items(db, edited) == set(skills[3:5])
    assert ollama.inputs == 14
    assert status_json(embedder_env)["kept"] == {"runs": 3, "items": 14, "retention_days": 30.0}


def test_a_skill_published_during_a_run_is_embedded_before_its_summary(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 6)
    call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the first summary")
    db.edit_skill(skills[0], description="Edited, so that the next run has work")
    gate = ollama.hold("Catalog skill 0000")
    try:
        run_id = call_backfill(embedder_env)
        gate.wait_held()
        # No job of the app's for these two: the run's close must find them in the catalog.
        newcomer = db.add_skill(TENANT_A, "Published meanwhile", "Its app job was lost")
        db.edit_skill(skills[1], status="draft")  # current at the start, no item of the run
    finally:
        gate.release()
    wait_until(lambda: len(summaries(worker.log())) == 2, what="the second summary")

    assert summaries(worker.log())[1] == (6, 6, 0)
    assert newcomer in embedded_ids(db)
    assert run_items(db, run_id) == {skills[0], newcomer}
    assert "Failed" not in worker.log()


@pytest.mark.slow  # a worker of its own
def test_reconcile_prunes_finished_runs_past_the_retention_but_never_an_open_one(
    db: Database, embedder_env: dict[str, str], tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    [skill] = published_catalog(db, 1)
    # (days since it started, days since it finished): the newest run, past the retention too,
    # stays for `status` to show.
    ages = {"old": (50, 49), "open": (60, None), "newest": (40, 39)}
    runs = {name: str(uuid.uuid4()) for name in ages}
    for name, (started, finished) in ages.items():
        db.execute(
            "INSERT INTO embedding_runs (id, started_at, finished_at, fanned_out, total)"
            " VALUES (:id, now() - make_interval(days => :started),"
            " now() - make_interval(days => CAST(:finished AS integer)), true, 1)",
            id=runs[name],
            started=started,
            finished=finished,
        )
        db.execute(
            "INSERT INTO embedding_run_items (run_id, skill_id, tenant_id, position, outcome)"
            " VALUES (:id, :skill, :tenant, 1, :outcome)",
            id=runs[name],
            skill=skill,
            tenant=TENANT_A,
            outcome=None if finished is None else "embedded",
        )
    env = {**embedder_env, "RUN_RETENTION_DAYS": "30"}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        subprocess.run(celery("call", "tasks.reconcile"), env=env, check=True, capture_output=True)
        wait_until(lambda: "Reconcile: pruned" in worker.log(), what="the prune")
    finally:
        worker.stop()

    kept = {str(row.id) for row in db.rows("SELECT id FROM embedding_runs")}
    assert kept == {runs["open"], runs["newest"]}
    assert db.scalar("SELECT count(*) FROM embedding_run_items") == 2
    line = "Reconcile: pruned 1 run finished more than RUN_RETENTION_DAYS (30) days ago"
    assert line in worker.log()
