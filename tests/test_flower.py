"""Flower (`celery -A worker flower`) on the test broker: what an operator sees, behind auth."""

from __future__ import annotations

import ast
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.fake_ollama import FakeOllama
from devstack.ports import free_port, wait_for_port
from devstack.postgres import LocalPostgres
from tasks import BULK, CELERY_DEFAULT, EMBED_SKILL, INTERACTIVE, enqueue_embed_skill
from tests.databases import TENANT_A, Database
from tests.processes import Process, celery
from tests.shared_worker import SharedWorker
from tests.waiting import wait_until

CREDENTIALS = ("admin", "secret")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Flower:
    """A running Flower and the HTTP calls an operator's browser or script makes."""

    def __init__(self, process: Process, url: str) -> None:
        self.process = process
        self.url = url

    def get(self, path: str, auth: tuple[str, str] | None = CREDENTIALS) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=auth, timeout=5.0)

    def api(self, path: str) -> Any:
        response = self.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    def embed_jobs(self) -> dict[str, dict[str, Any]]:
        """The `tasks.embed_skill` tasks Flower saw, keyed by skill id."""
        jobs = {}
        for task in self.api(f"/api/tasks?taskname={EMBED_SKILL}").values():
            if task.get("args"):
                jobs[ast.literal_eval(task["args"])[0]] = task
        return jobs

    def job_state(self, skill_id: str) -> str | None:
        state: str | None = self.embed_jobs().get(skill_id, {}).get("state")
        return state

    def workers_alive(self) -> dict[str, bool]:
        alive: dict[str, bool] = self.api("/api/workers?status=1")
        return alive


def start_flower(env: dict[str, str], log_path: Path, *celery_args: str) -> Flower:
    port = free_port()
    args = celery(*celery_args, "flower", f"--port={port}", "--address=127.0.0.1")
    process = Process(args, env, log_path).start()
    try:
        wait_for_port("127.0.0.1", port, timeout=20.0)
    except TimeoutError:
        process.stop()
        raise AssertionError(f"Flower did not listen:\n{process.log()[-3000:]}") from None
    return Flower(process, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def flower_env(
    postgres: LocalPostgres, shared: SharedWorker, ollama_server: FakeOllama
) -> dict[str, str]:
    """The worker's settings on the shared worker's broker (Flower never opens the database)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLOWER_")}
    env.update(
        DATABASE_URL=postgres.url(),
        REDIS_URL=shared.redis_url,
        OLLAMA_URL=ollama_server.url,
        PYTHONPATH=str(PROJECT_ROOT),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def flower(
    flower_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Flower]:
    """One Flower for the module, with FLOWER_BASIC_AUTH as docker-compose sets it."""
    env = {**flower_env, "FLOWER_BASIC_AUTH": "admin:secret"}
    server = start_flower(env, tmp_path_factory.mktemp("flower") / "flower.log")
    try:
        yield server
    finally:
        server.process.stop(timeout=1.0)  # no state to save: killed if slow


@pytest.fixture
def tenant(db: Database) -> str:
    db.add_tenant(TENANT_A)
    return TENANT_A


@pytest.fixture
def watched_worker(flower: Flower, worker: Process) -> str:
    """The test's worker, once Flower gets its events (those sent before are lost): its name."""
    names = wait_until(
        lambda: [name for name, alive in flower.workers_alive().items() if alive],
        what="Flower to see the worker online",
    )
    [name] = names
    return name


@pytest.mark.parametrize("path", ["/", "/tasks", "/api/tasks", "/api/workers"])
def test_flower_refuses_a_request_without_credentials(flower: Flower, path: str) -> None:
    assert flower.get(path, auth=None).status_code == 401


def test_flower_asks_a_browser_for_basic_credentials(flower: Flower) -> None:
    response = flower.get("/", auth=None)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="flower"'


@pytest.mark.parametrize("auth", [("admin", "wrong"), ("root", "secret"), ("admin", "")])
def test_flower_refuses_wrong_credentials(flower: Flower, auth: tuple[str, str]) -> None:
    assert flower.get("/", auth=auth).status_code == 401
    assert flower.get("/api/tasks", auth=auth).status_code == 401


def test_flower_answers_the_configured_credentials(flower: Flower) -> None:
    assert flower.get("/").status_code == 200
    response = flower.get("/api/tasks")
    assert response.status_code == 200
    assert isinstance(response.json(), dict)


@pytest.mark.slow
def test_flower_is_protected_by_basic_auth_set_in_the_env_file(
    flower_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("FLOWER_BASIC_AUTH=admin:secret\n")
    server = start_flower(flower_env, tmp_path / "flower.log", f"--workdir={tmp_path}")
    try:
        assert server.get("/", auth=None).status_code == 401
        assert server.get("/").status_code == 200
    finally:
        server.process.stop(timeout=1.0)  # no state to save: killed if slow


def test_flower_shows_the_worker_online_with_its_queues(
    flower: Flower, watched_worker: str
) -> None:
    workers = flower.api("/api/workers?refresh=1")

    assert list(workers) == [watched_worker]
    info = workers[watched_worker]
    assert {queue["name"] for queue in info["active_queues"]} == {CELERY_DEFAULT, INTERACTIVE, BULK}
    assert EMBED_SKILL in info["registered"]
    assert info["stats"]["pool"]["max-concurrency"] == 1


def test_flower_lists_each_embed_job_with_its_state_retries_and_reason(
    db: Database,
    tenant: str,
    flower: Flower,
    watched_worker: str,
    redis_url: str,
    ollama: FakeOllama,
) -> None:
    fine = db.add_skill(tenant, "Review pull requests", "Flag risky changes before merge")
    flaky = db.add_skill(tenant, "Explain a SQL query plan", "In plain words")

    assert enqueue_embed_skill(fine, tenant, broker_url=redis_url)
    assert enqueue_embed_skill("missing-id", tenant, broker_url=redis_url)
    wait_until(lambda: flower.job_state("missing-id") == "FAILURE", what="the failure")
    ollama.fail_next(2, 500)
    assert enqueue_embed_skill(flaky, tenant, broker_url=redis_url)

    finished = {fine: "SUCCESS", "missing-id": "FAILURE", flaky: "SUCCESS"}
    wait_until(
        lambda: {skill: job["state"] for skill, job in flower.embed_jobs().items()} == finished,
        what="Flower to see every job end",
    )

    jobs = flower.embed_jobs()
    assert set(jobs) == {fine, "missing-id", flaky}
    assert {job["worker"] for job in jobs.values()} == {watched_worker}
    assert jobs[fine]["state"] == "SUCCESS"
    assert jobs[fine]["result"] == "'embedded'"
    assert jobs[fine]["retries"] == 0
    failed = jobs["missing-id"]
    assert failed["state"] == "FAILURE"
    assert "no skill 'missing-id' in tenant" in failed["exception"]
    assert "\n" not in failed["exception"]
    assert failed["retries"] == 0
    retried = jobs[flaky]
    assert retried["state"] == "SUCCESS"
    assert retried["retries"] == 2
    assert retried["retried"] is not None
    assert "answered 500" in retried["exception"]  # the last retry's reason stays visible


def test_flower_shows_a_queued_job_before_a_worker_takes_it(
    db: Database,
    tenant: str,
    flower: Flower,
    watched_worker: str,
    redis_url: str,
    ollama: FakeOllama,
) -> None:
    ahead = db.add_skill(tenant, "Review pull requests", "Keeps the worker busy")
    waiting = db.add_skill(tenant, "Explain a SQL query plan", "Waits for its turn")
    gate = ollama.hold()
    try:
        assert enqueue_embed_skill(ahead, tenant, broker_url=redis_url)
        gate.wait_held()  # the worker's one job is with Ollama: no worker takes the next one
        assert enqueue_embed_skill(waiting, tenant, broker_url=redis_url)

        wait_until(lambda: flower.job_state(waiting) == "PENDING", what="the sent event")
    finally:
        gate.release()
    wait_until(lambda: flower.job_state(waiting) == "SUCCESS", what="the job to run after")


@pytest.mark.slow
def test_flower_refuses_to_start_without_a_login(
    flower_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    result = subprocess.run(
        celery("flower", f"--port={port}", "--address=127.0.0.1"),
        env=flower_env,
        cwd=tmp_path,  # no .env, no flowerconfig.py
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert "FLOWER_BASIC_AUTH=user:password" in line
    assert result.stdout.strip() == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({}, ["--basic-auth=admin:secret"]),
        ({"FLOWER_AUTH": r".*@example\.com"}, []),
    ],
    ids=["basic-auth-option", "oauth"],
)
def test_flower_starts_with_another_login_setting(
    flower_env: dict[str, str], tmp_path: Path, env: dict[str, str], args: list[str]
) -> None:
    port = free_port()
    process = Process(
        celery("flower", f"--port={port}", "--address=127.0.0.1", *args),
        {**flower_env, **env},
        tmp_path / "flower.log",
    ).start()
    try:
        wait_for_port("127.0.0.1", port, timeout=20.0)
        # Behind a login either way: basic auth answers 401, OAuth sends to its login page.
        response = httpx.get(f"http://127.0.0.1:{port}/tasks", timeout=5.0)
        assert response.status_code in (302, 401), response.text
    finally:
        process.stop(timeout=1.0)
