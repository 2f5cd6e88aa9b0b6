"""LOG_FORMAT=json: the worker writes one JSON object per line, with the job's ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.fake_ollama import FakeOllama
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


@pytest.mark.slow
def test_a_job_that_finds_ollama_down_logs_one_line_per_retry(
    db: Database, embedder_env: dict[str, str], redis_url: str, ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    ollama.down()
    # A worker of its own: its log holds this job's lines and nothing of an earlier test.
    worker = start_worker(embedder_env, tmp_path / "worker.log")
    try:
        assert enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
        # EMBED_MAX_RETRIES=4: the fifth attempt fails the job, after every retry was logged.
        failed = f"Failed after 5 attempts: {skill}"
        wait_until(lambda: failed in worker.log(), what="the job's failure")
        log = worker.log()
    finally:
        worker.stop()

    first_job = log.split(failed)[0]  # a catch-up may queue the skill again afterwards
    retries = [line for line in first_job.splitlines() if "retry" in line.lower()]
    assert len(retries) == 4, "\n".join(retries)
    assert all(f"Retrying {skill}" in line and "cannot reach Ollama" in line for line in retries)
