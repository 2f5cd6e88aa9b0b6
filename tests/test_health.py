"""`python -m worker health [--ready]`: liveness from the worker's heartbeat, readiness of parts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.fake_ollama import FakeOllama
from tests.databases import TENANT_A, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "health", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def health_env(embedder_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **embedder_env,
        "HEALTH_DIR": str(tmp_path / "health"),
        "HEARTBEAT_INTERVAL_SECONDS": "0.5",
    }


@pytest.fixture
def live_worker(health_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    process = start_worker(health_env, tmp_path / "worker.log")
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            os.killpg(process.process.pid, signal.SIGCONT)
        process.kill()  # the test is over: its shutdown is not under test


@pytest.mark.slow
def test_health_fails_within_seconds_of_the_worker_being_stopped(
    live_worker: Process, health_env: dict[str, str]
) -> None:
    result = health(health_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: worker: test@")

    assert live_worker.process is not None
    os.killpg(live_worker.process.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    failing = wait_until(
        lambda: (r := health(health_env)).returncode == 1 and r, timeout=15, what="health to fail"
    )

    assert time.monotonic() - stopped < 5
    [line] = failing.stderr.splitlines()
    assert line.startswith("worker: test@")
    assert "has not consumed for" in line

    os.killpg(live_worker.process.pid, signal.SIGCONT)
    wait_until(lambda: health(health_env).returncode == 0, timeout=15, what="health again")


def test_health_fails_when_no_worker_ever_ran(health_env: dict[str, str]) -> None:
    result = health(health_env)

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("worker: no heartbeat of any worker in ")


@pytest.mark.slow
def test_ready_names_the_ollama_that_lacks_the_model(
    db: Database, live_worker: Process, health_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    ready = health(health_env, "--ready")
    assert ready.returncode == 0, ready.stderr
    assert "ok: postgresql" in ready.stdout
    assert f"ok: ollama {ollama.url}: nomic-embed-text ready" in ready.stdout

    ollama.models = set()
    result = health(health_env, "--ready")

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"ollama {ollama.url}: model 'nomic-embed-text' is not pulled")
    assert "ollama pull nomic-embed-text" in line


@pytest.mark.slow
def test_ready_names_an_unreachable_redis(live_worker: Process, health_env: dict[str, str]) -> None:
    from devstack.ports import free_port

    env = {**health_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}

    result = health(env, "--ready")

    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("redis: cannot reach redis://127.0.0.1:")
