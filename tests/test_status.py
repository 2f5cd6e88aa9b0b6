"""`python -m worker status --failures` and `--json`: failed skills by name, counts for scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.fake_ollama import FakeOllama
from tasks import enqueue_embed_skill
from tests.backfills import call_backfill, summaries
from tests.databases import TENANT_A, TENANT_B, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until


def status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "status", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result


def status_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(status(env, "--json", *args).stdout)


@pytest.fixture
def one_skill_a_request(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    """A worker that sends each skill alone, so a refused request fails exactly one skill."""
    process = start_worker({**embedder_env, "EMBED_BATCH_SIZE": "1"}, tmp_path / "worker.log")
    try:
        yield process
    finally:
        process.kill()  # the test is over: its shutdown is not under test


@pytest.mark.slow
def test_failures_name_the_skills_ollama_refused_with_the_reason(
    db: Database,
    one_skill_a_request: Process,
    embedder_env: dict[str, str],
    ollama: FakeOllama,
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    names = {db.add_skill(TENANT_A, f"Skill A{i}", "Does a thing"): f"Skill A{i}" for i in range(3)}
    names |= {
        db.add_skill(TENANT_B, f"Skill B{i}", "Does a thing"): f"Skill B{i}" for i in range(3)
    }
    ollama.fail_next(2, 400, "input is not valid")

    call_backfill(embedder_env)
    wait_until(lambda: summaries(one_skill_a_request.log()), what="the summary")

    assert summaries(one_skill_a_request.log()) == [(4, 6, 2)]
    failed = {
        str(row.skill_id): str(row.tenant_id)
        for row in db.rows(
            "SELECT skill_id, tenant_id FROM embedding_run_items WHERE outcome = 'failed'"
        )
    }
    assert len(failed) == 2
    document = status_json(embedder_env, "--failures")
    run = document["run"]
    assert run["failed"] == 2
    listed = {row["skill_id"]: row for row in run["failures"]}
    assert listed.keys() == failed.keys()
    for skill_id, row in listed.items():
        assert row["tenant_id"] == failed[skill_id]
        assert row["name"] == names[skill_id]
        assert "refused the input (400: input is not valid)" in row["reason"]
        assert row["attempts"] == 1
        assert row["failed_at"]
    times = [row["failed_at"] for row in run["failures"]]
    assert times == sorted(times, reverse=True)
    assert document["outside_runs"] == []
    table = status(embedder_env, "--failures").stdout
    for skill_id in failed:
        assert names[skill_id] in table
        assert skill_id in table
    assert table.count("refused the input") == 2


def test_status_json_counts_equal_the_database(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B, enabled=False)
    for i in range(5):
        db.add_skill(TENANT_A, f"Skill {i}", "Does a thing")
    db.add_skill(TENANT_B, "Not enabled", "Does a thing")
    # The five go in one batch; refusing it, then its first half, then that half's first
    # input leaves exactly one skill failed.
    ollama.fail_next(3, 400)
    call_backfill(embedder_env)
    wait_until(lambda: summaries(worker.log()), what="the summary")

    document = status_json(embedder_env)

    tenants = {row["tenant_id"]: row for row in document["tenants"]}
    for tenant in (TENANT_A, TENANT_B):
        published = db.scalar(
            "SELECT count(*) FROM skills WHERE tenant_id = :t AND status = 'published'", t=tenant
        )
        embedded = db.scalar("SELECT count(*) FROM skill_embeddings WHERE tenant_id = :t", t=tenant)
        assert tenants[tenant]["published"] == published
        assert tenants[tenant]["embedded"] == embedded
        assert tenants[tenant]["missing"] == published - embedded
    assert tenants[TENANT_A]["semantic_search"] is True
    assert tenants[TENANT_B]["semantic_search"] is False
    [stored] = db.rows("SELECT * FROM embedding_runs")
    run = document["run"]
    assert run["id"] == stored.id
    for key in ("total", "embedded", "unchanged", "failed", "skipped"):
        assert run[key] == getattr(stored, key), key
    assert run["failed"] == db.scalar(
        "SELECT count(*) FROM embedding_run_items WHERE outcome = 'failed'"
    )
    assert run["pending"] == 0
    assert run["failed"] == 1
    assert run["summary"] == "Done. Embedded 4/5 skills. 1 failures."
    assert document["oldest_pending"] is None
    assert "No item is pending." in status(embedder_env).stdout


def test_a_failed_job_outside_runs_is_listed_until_the_skill_is_embedded(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama, redis_url: str
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    ollama.fail_next(1, 400, "input is not valid")

    assert enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
    wait_until(lambda: "Failed" in worker.log(), what="the failure line")

    [row] = status_json(embedder_env, "--failures")["outside_runs"]
    assert row["skill_id"] == skill
    assert row["tenant_id"] == TENANT_A
    assert row["name"] == "Review pull requests"
    assert "input is not valid" in row["reason"]
    assert row["attempts"] == 1

    assert enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
    wait_until(lambda: db.embedding_rows(), what="the embedding row")
    assert status_json(embedder_env, "--failures")["outside_runs"] == []
