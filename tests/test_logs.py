"""LOG_FORMAT=json: the worker writes one JSON object per line, with the job's ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks import enqueue_embed_skill
from tests.databases import TENANT_A, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until


@pytest.fixture
def json_worker(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    process = start_worker({**embedder_env, "LOG_FORMAT": "json"}, tmp_path / "worker.log")
    try:
        yield process
    finally:
        process.kill()  # the test is over: its shutdown is not under test


def records(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.strip()]


@pytest.mark.slow
def test_json_logs_carry_the_ids_of_the_job_that_embedded_a_skill(
    db: Database, json_worker: Process, redis_url: str
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")

    assert enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
    wait_until(lambda: "Embedded: Review pull requests" in json_worker.log(), what="the line")

    lines = records(json_worker.log())  # every line parses
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    [embedded] = [line for line in lines if line["message"] == "Embedded: Review pull requests"]
    assert embedded["level"] == "INFO"
    assert embedded["skill_id"] == skill
    assert embedded["tenant_id"] == TENANT_A
    assert embedded["task_id"]
    assert "run_id" not in embedded
    assert any(line["message"].endswith("ready.") for line in lines)
