"""The web app's producer: `examples/node` queues `tasks.embed_skill` with celery-node."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from db.catalog import input_hash, skill_text
from devstack.ports import free_port
from tasks import BULK, EMBED_SKILL, INTERACTIVE, enqueue_embed_skill
from tests.databases import TENANT_A, Database
from tests.processes import Process
from tests.waiting import wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
SCRIPT = "enqueue-embed-skill.mjs"
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "everyskill-embedder"
    / "node-example"
)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """celery-node installed once per lock file, in a cache outside the checkout."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("node and npm are not installed: the Node producer example cannot run")
    lock = EXAMPLE / "package-lock.json"
    manifests = [EXAMPLE / "package.json", *([lock] if lock.exists() else [])]
    key = hashlib.sha256(b"".join(path.read_bytes() for path in manifests)).hexdigest()[:16]
    installed = CACHE / key
    if (installed / "node_modules" / "celery-node" / "package.json").exists():
        return installed / "node_modules"
    shutil.rmtree(installed, ignore_errors=True)  # a half-written cache from an older run
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=CACHE))
    for path in manifests:
        shutil.copy(path, staging)
    command = [npm, "ci" if lock.exists() else "install", "--no-audit", "--no-fund"]
    result = subprocess.run(command, cwd=staging, capture_output=True, text=True, timeout=150)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"`npm {command[1]}` failed in {EXAMPLE}:\n{result.stderr[-3000:]}")
    try:
        staging.rename(installed)
    except OSError:  # a parallel run installed the same lock first
        shutil.rmtree(staging, ignore_errors=True)
    return installed / "node_modules"


@pytest.fixture(scope="session")
def script(node_modules: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's script, beside a link to the cached node_modules."""
    directory = tmp_path_factory.mktemp("node-producer")
    shutil.copy(EXAMPLE / SCRIPT, directory)
    (directory / "node_modules").symlink_to(node_modules, target_is_directory=True)
    return directory / SCRIPT


def run_node(script: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url}
    return subprocess.run(
        ["node", script.name, *args],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def row_hash(db: Database, skill_id: str) -> object:
    return db.scalar("SELECT input_hash FROM skill_embeddings WHERE skill_id = :s", s=skill_id)


def queued(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in a queue, oldest first, each with its body decoded."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = list(reversed(client.lrange(queue, 0, -1)))  # LPUSH in, BRPOP out
    finally:
        client.close()
    messages = [json.loads(item) for item in raw]
    for message in messages:
        message["decoded"] = json.loads(base64.b64decode(message["body"]))
    return messages


def test_a_skill_queued_from_node_gets_its_row(
    db: Database, worker: Process, redis_url: str, script: Path
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes before merge")

    result = run_node(script, redis_url, skill, TENANT_A)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"queued {EMBED_SKILL} for {skill} on {INTERACTIVE}\n"
    text = skill_text("Review pull requests", "Flag risky changes before merge")
    wait_until(lambda: row_hash(db, skill) == input_hash(text), what="the embedding row")
    [row] = db.embedding_rows()
    assert row.tenant_id == TENANT_A
    wait_until(lambda: "Embedded: Review pull requests" in worker.log(), what="the log line")
    assert "Traceback" not in worker.log()


def test_node_queues_the_python_producers_job_on_the_interactive_queue(
    redis_url: str, script: Path
) -> None:
    assert enqueue_embed_skill("skill-1", TENANT_A, broker_url=redis_url)

    result = run_node(script, redis_url, "skill-1", TENANT_A)

    assert result.returncode == 0, result.stderr
    assert queued(redis_url, BULK) == []
    from_python, from_node = queued(redis_url, INTERACTIVE)
    assert (
        from_node["decoded"][:2]
        == from_python["decoded"][:2]
        == [
            ["skill-1"],
            {"tenant_id": TENANT_A},
        ]
    )
    assert from_node["headers"]["task"] == from_python["headers"]["task"] == EMBED_SKILL
    assert from_node["headers"]["id"] != from_python["headers"]["id"]
    assert from_node["content-type"] == "application/json"
    assert from_node["properties"]["delivery_info"]["routing_key"] == INTERACTIVE


def test_node_without_redis_fails_within_two_seconds_with_one_line(script: Path) -> None:
    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"

    started = time.monotonic()
    result = run_node(script, nothing_listens, "skill-1", TENANT_A)
    elapsed = time.monotonic() - started

    assert result.returncode != 0
    assert elapsed < 2.0
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: could not enqueue {EMBED_SKILL} for skill-1: ")
    assert "ECONNREFUSED" in lines[0]


NO_QUEUE_SCRIPT = """
import { createClient } from "celery-node";

// No queue option: celery-node sends to Celery's default queue, "celery". The connection
// stays open; the test stops this process once the skill is embedded.
const [skillId, tenantId] = process.argv.slice(2);
const client = createClient(process.env.REDIS_URL, process.env.REDIS_URL);
client.createTask("tasks.embed_skill").applyAsync([skillId], { tenant_id: tenantId });
console.log("sent");
"""


def test_a_skill_queued_from_node_without_a_queue_option_is_embedded(
    db: Database, worker: Process, redis_url: str, script: Path
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes before merge")
    producer = script.parent / "no-queue.mjs"
    producer.write_text(NO_QUEUE_SCRIPT)

    node = subprocess.Popen(
        ["node", producer.name, skill, TENANT_A],
        cwd=script.parent,
        env={**os.environ, "REDIS_URL": redis_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        text = skill_text("Review pull requests", "Flag risky changes before merge")
        wait_until(lambda: row_hash(db, skill) == input_hash(text), what="the embedding row")
    finally:
        node.terminate()
        node.wait(10)

    wait_until(lambda: "Embedded: Review pull requests" in worker.log(), what="the log line")
    assert "Traceback" not in worker.log()
