"""Backfills meeting each other and a catalog that changes under a run, on real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from devstack.fake_ollama import FakeOllama
from tasks import INTERACTIVE, enqueue_embed_skill
from tests.backfills import (
    call_backfill,
    embedded_ids,
    published_catalog,
    status_json,
    summaries,
)
from tests.databases import TENANT_A, TENANT_B, Database
from tests.processes import Process, celery, start_worker
from tests.waiting import wait_until


def all_logs(workers: list[Process]) -> str:
    return "\n".join(worker.log() for worker in workers)


def backfill_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", "backfill", *args]


def starts_waiting(db: Database) -> int:
    """Workers' transactions waiting for a lock: the start lock, or the test's on the table."""
    return int(
        db.scalar(  # type: ignore[arg-type]
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'everyskill-embedder' AND wait_event_type = 'Lock'"
        )
    )


@pytest.mark.slow
def test_two_backfills_started_together_send_each_skill_to_ollama_once(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 48)
    env = {**embedder_env, "EMBED_BATCH_SIZE": "8"}
    # Ollama holds every batch: the first run is still open whatever the second one does.
    gate = ollama.hold()
    # A start records its run in this table: held here, the first start waits on it, and the
    # second at the start lock (or, without one, on this table beside the first).
    admin = db.admin.connect()
    held = admin.begin()
    admin.execute(sa.text("LOCK TABLE embedding_runs IN SHARE MODE"))
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
        wait_until(lambda: starts_waiting(db) == 2, timeout=60, what="both starts under way")
        held.rollback()
        wait_until(lambda: "joins backfill" in all_logs(workers), what="the second to join")
        gate.release()
        out, err = waiting.communicate(timeout=120)
        wait_until(lambda: summaries(all_logs(workers)), what="the summary")
    finally:
        if held.is_active:
            held.rollback()
        admin.close()
        gate.release()
        waiting.kill()
        for worker in workers:
            worker.stop()

    logs = all_logs(workers)
    assert summaries(logs) == [(48, 48, 0)]
    assert len([line for line in logs.splitlines() if "joins backfill" in line]) == 1
    assert embedded_ids(db) == set(skills)
    texts = ollama.texts
    assert len(texts) == len(set(texts)) == 48
    assert waiting.returncode == 0, err
    assert out.strip().endswith("Done. Embedded 48/48 skills. 0 failures.")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "second", "scope"),
    [
        ({"tenant_id": TENANT_A}, [], f"tenant {TENANT_A}"),
        ({}, ["--force"], "every tenant"),
    ],
    ids=["one-tenant-then-all", "unforced-then-forced"],
)
def test_a_backfill_the_open_run_does_not_cover_is_refused_in_one_line(
    db: Database,
    worker: Process,
    embedder_env: dict[str, str],
    ollama: FakeOllama,
    first: dict[str, str],
    second: list[str],
    scope: str,
    tmp_path: Path,
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    skills = published_catalog(db, 30) + published_catalog(db, 10, TENANT_B)
    expected = 30 if first else 40
    # The worker's one slot waits with a job of the held run: the backfills go to a worker of
    # the interactive lane alone, whose batch loop may log the open run's summary.
    lane = Process(
        celery("worker", "--loglevel=INFO", "--hostname=lane@%h", "--without-mingle",
               "--without-gossip", "-Q", INTERACTIVE),
        embedder_env, tmp_path / "lane.log",
    ).start(ready="ready.")  # fmt: skip
    gate = ollama.hold()
    try:
        open_run = call_backfill(embedder_env, "--kwargs", json.dumps(first))
        gate.wait_held()
        refused = subprocess.run(
            backfill_command(*second, "--wait", "--timeout", "60"),
            env=embedder_env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        still_open = db.scalar("SELECT finished_at IS NULL FROM embedding_runs WHERE id = :id",
                               id=open_run)  # fmt: skip
        gate.release()
        wait_until(lambda: summaries(all_logs([worker, lane])), 60, "the open run's summary")
    finally:
        gate.release()
        lane.stop()

    second_id = refused.stdout.split()[1]
    line = (
        f"Backfill refused: backfill {open_run} ({scope}) is still running and holds some of"
        " these skills: start this one after its summary"
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [f"error: {line}"]
    assert still_open is True
    log = all_logs([worker, lane])
    assert f"tasks.backfill[{second_id}] raised expected: BackfillBusy('{line}')" in log
    assert "joins backfill" not in log
    assert "Traceback" not in log
    # Nothing of the second was recorded or queued; the first ends with its one summary.
    assert db.scalar("SELECT count(*) FROM embedding_runs") == 1
    assert db.scalar("SELECT count(*) FROM embedding_run_items WHERE run_id <> :id",
                     id=open_run) == 0  # fmt: skip
    assert summaries(log) == [(expected, expected, 0)]
    assert embedded_ids(db) == set(skills[:expected])


@pytest.mark.slow
def test_a_skill_deleted_or_unpublished_during_a_run_is_no_failure(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 40)
    order = sorted(skills)  # the run's queue order
    names = {skill: f"Catalog skill {i:04d}" for i, skill in enumerate(skills)}
    env = {**embedder_env, "EMBED_BATCH_SIZE": "8"}
    worker = start_worker(env, tmp_path / "worker.log")
    gate = ollama.hold(names[order[16]])
    try:
        call_backfill(env)
        gate.wait_held()
        db.execute("DELETE FROM skills WHERE id = :id", id=order[30])
        db.edit_skill(order[35], status="draft")
        gate.release()
        wait_until(lambda: summaries(worker.log()), what="the summary")
    finally:
        gate.release()
        worker.stop()

    log = worker.log()
    assert summaries(log) == [(38, 38, 0)]
    summary = log.splitlines().index(next(line for line in log.splitlines() if "Done." in line))
    assert log.splitlines()[summary + 1].endswith(
        "2 skills left the catalog during the run (1 unpublished, 1 deleted)."
    )
    assert "Failed" not in log
    assert "check the id" not in log
    assert embedded_ids(db) == set(order) - {order[30], order[35]}
    run = status_json(env)["run"]
    assert (run["total"], run["failed"]) == (38, 0)
    assert run["left_catalog"] == {"unpublished": 1, "deleted": 1}


@pytest.mark.slow
def test_the_summary_is_exact_when_the_catalog_changes_during_the_run(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 60)
    order = sorted(skills)
    names = {skill: f"Catalog skill {i:04d}" for i, skill in enumerate(skills)}
    env = {**embedder_env, "EMBED_BATCH_SIZE": "8"}
    worker = start_worker(env, tmp_path / "worker.log")
    gate = ollama.hold(names[order[16]])
    operator = subprocess.Popen(
        backfill_command("--wait", "--timeout", "120"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        gate.wait_held()
        db.execute("DELETE FROM skills WHERE id = :id", id=order[40])
        db.edit_skill(order[50], status="draft")
        # Edits of skills already embedded, in the batch at Ollama, and not yet claimed, each
        # followed by the app's job.
        for skill in [*order[0:8], *order[16:24], *order[30:34]]:
            db.edit_skill(skill, description=f"Edited while the backfill runs: {skill}")
            assert enqueue_embed_skill(skill, TENANT_A, broker_url=env["REDIS_URL"])
        gate.release()
        out, err = operator.communicate(timeout=120)
        wait_until(lambda: summaries(worker.log()), what="the summary")
    finally:
        gate.release()
        operator.kill()
        worker.stop()

    expected = [
        "Done. Embedded 58/58 skills. 0 failures.",
        "2 skills left the catalog during the run (1 unpublished, 1 deleted).",
    ]
    assert operator.returncode == 0, err
    assert out.strip().splitlines()[-2:] == expected
    log = worker.log()
    assert summaries(log) == [(58, 58, 0)]
    assert expected[1] in log
    status = status_json(env)
    assert status["run"]["summary"] == expected[0]
    assert status["run"]["left_catalog"] == {"unpublished": 1, "deleted": 1}
    [tenant] = status["tenants"]
    assert (tenant["published"], tenant["embedded"], tenant["stale"], tenant["missing"]) == (
        58, 58, 0, 0,
    )  # fmt: skip
