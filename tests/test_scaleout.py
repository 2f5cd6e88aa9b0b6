"""Several workers, each with its own Ollama or sharing one: guarantees across processes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from devstack.fake_ollama import FakeOllama
from tasks import enqueue_embed_skill
from tests.backfills import call_backfill, embedded_ids, published_catalog, summaries
from tests.databases import TENANT_A, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until

# What all-MiniLM costs on this kind of CPU: a batch of 32 holds Ollama for about 145 ms.
REQUEST_SECONDS, INPUT_SECONDS = 0.0075, 0.0043


@pytest.fixture
def fakes() -> Iterator[list[FakeOllama]]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                FakeOllama(request_latency=REQUEST_SECONDS, input_latency=INPUT_SECONDS)
            )
            for _ in range(3)
        ]
        yield servers


@pytest.fixture
def start(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[object]:
    """Start workers (name, OLLAMA_URL) on the shared Redis and PostgreSQL; stops them after."""
    started: list[Process] = []

    def start_one(name: str, ollama_url: str, **env: str) -> Process:
        process = start_worker(
            {**embedder_env, "OLLAMA_URL": ollama_url, **env}, tmp_path / f"{name}.log", name
        )
        started.append(process)
        return process

    yield start_one
    for process in started:
        process.kill()  # the test is over: its shutdown is not under test


def all_logs(workers: list[Process]) -> str:
    return "\n".join(worker.log() for worker in workers)


def duplicate_rows(db: Database) -> int:
    return int(
        db.scalar(  # type: ignore[arg-type]
            "SELECT count(*) - count(DISTINCT (tenant_id, skill_id)) FROM skill_embeddings"
        )
    )


@pytest.mark.slow
def test_two_workers_each_use_their_own_ollama_when_the_tenant_names_none(
    db: Database, embedder_env: dict[str, str], fakes: list[FakeOllama], start: object
) -> None:
    # The seed plan's starting point: the default tenant has no site_settings row yet.
    db.add_tenant(TENANT_A, settings=False)
    skills = published_catalog(db, 1000)
    workers = [start(f"w{i}", fakes[i].url) for i in range(2)]  # type: ignore[operator]

    call_backfill(embedder_env)

    wait_until(lambda: summaries(all_logs(workers)), timeout=90, what="the summary")
    assert summaries(all_logs(workers)) == [(1000, 1000, 0)]
    assert embedded_ids(db) == set(skills)
    assert duplicate_rows(db) == 0
    inputs = [fakes[0].inputs, fakes[1].inputs]
    assert min(inputs) >= 0.3 * sum(inputs), f"inputs per Ollama: {inputs}"
    assert [fakes[0].max_concurrent, fakes[1].max_concurrent] == [1, 1]
    # The app's own query embedding keeps the app's default: no worker pinned its URL there.
    assert db.scalar("SELECT ollama_url FROM site_settings") == "http://localhost:11434"


@pytest.mark.slow
def test_three_workers_on_one_pinned_ollama_send_it_one_request_at_a_time(
    db: Database, embedder_env: dict[str, str], fakes: list[FakeOllama], start: object
) -> None:
    shared, *others = fakes
    db.add_tenant(TENANT_A)
    db.set_ollama(TENANT_A, shared.url)
    skills = published_catalog(db, 600)
    workers = [start(f"w{i}", others[i % 2].url) for i in range(3)]  # type: ignore[operator]

    call_backfill(embedder_env)

    wait_until(lambda: summaries(all_logs(workers)), timeout=90, what="the summary")
    assert summaries(all_logs(workers)) == [(600, 600, 0)]
    assert embedded_ids(db) == set(skills)
    assert duplicate_rows(db) == 0
    assert shared.max_concurrent == 1
    assert shared.inputs >= 600
    assert others[0].requests == others[1].requests == 0
    # Every worker took part: each logged progress lines of its own.
    assert all("] Embedded: " in worker.log() for worker in workers)


@pytest.mark.slow
def test_a_worker_started_mid_backfill_takes_part_at_once(
    db: Database, embedder_env: dict[str, str], fakes: list[FakeOllama], start: object
) -> None:
    db.add_tenant(TENANT_A, settings=False)
    skills = published_catalog(db, 600)
    first_ollama, second_ollama, _ = fakes
    gate = first_ollama.hold()  # the first worker's Ollama answers nothing until we say
    first = start("first", first_ollama.url)  # type: ignore[operator]
    call_backfill(embedder_env)
    gate.wait_held()

    second = start("second", second_ollama.url)  # type: ignore[operator]
    # While the first worker waits on its Ollama, the new one embeds the run's other items.
    wait_until(lambda: second_ollama.inputs > 0, what="the second worker's first batch")
    gate.release()

    wait_until(lambda: summaries(all_logs([first, second])), timeout=90, what="the summary")
    assert summaries(all_logs([first, second])) == [(600, 600, 0)]
    assert embedded_ids(db) == set(skills)
    assert duplicate_rows(db) == 0
    assert first_ollama.inputs + second_ollama.inputs >= 600


def pool_children(worker: Process) -> list[psutil.Process]:
    assert worker.process is not None
    return psutil.Process(worker.process.pid).children()


@pytest.mark.slow
def test_a_skill_that_kills_its_pool_process_fails_after_the_delivery_limit(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, start: object
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 40)
    poison = db.add_skill(TENANT_A, "Poison pill", "POISON kills whoever embeds it")
    # A short request timeout: a killed process's Ollama slot frees itself sooner.
    worker = start(  # type: ignore[operator]
        "w", ollama.url, OLLAMA_TIMEOUT_SECONDS="1", EMBED_MAX_DELIVERIES="3"
    )
    gate = ollama.hold(match="POISON")
    call_backfill(embedder_env)

    kills = 0
    deadline = time.monotonic() + 90
    while not summaries(worker.log()) and time.monotonic() < deadline:
        try:
            gate.wait_held(timeout=1)
        except TimeoutError:
            continue
        [child] = pool_children(worker)
        child.kill()  # as the OOM killer would: SIGKILL, no cleanup
        child.wait()
        kills += 1
        gate.release()  # answers into the dead connection
        gate = ollama.hold(match="POISON")

    assert kills == 3
    assert summaries(worker.log()) == [(40, 41, 1)]
    assert embedded_ids(db) == set(skills)
    assert "the worker process died 3 times while embedding Poison pill" in worker.log()
    assert db.scalar("SELECT detail FROM embedding_run_items WHERE skill_id = :id", id=poison) == (
        "the worker process died 3 times while embedding Poison pill"
    )


@pytest.mark.slow
def test_a_job_from_the_app_that_kills_its_pool_process_is_delivered_at_most_the_limit(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, start: object
) -> None:
    db.add_tenant(TENANT_A)
    poison = db.add_skill(TENANT_A, "Poison pill", "POISON kills whoever embeds it")
    fine = db.add_skill(TENANT_A, "Harmless skill", "Published after the poison")
    worker = start(  # type: ignore[operator]
        "w", ollama.url, OLLAMA_TIMEOUT_SECONDS="1", EMBED_MAX_DELIVERIES="3"
    )
    gate = ollama.hold(match="POISON")
    assert enqueue_embed_skill(poison, TENANT_A, broker_url=embedder_env["REDIS_URL"])
    assert enqueue_embed_skill(fine, TENANT_A, broker_url=embedder_env["REDIS_URL"])

    kills = 0
    deadline = time.monotonic() + 60
    while "the worker process died" not in worker.log() and time.monotonic() < deadline:
        try:
            gate.wait_held(timeout=1)
        except TimeoutError:
            continue
        [child] = pool_children(worker)
        child.kill()
        child.wait()
        kills += 1
        gate.release()
        gate = ollama.hold(match="POISON")

    assert kills == 3
    wait_until(lambda: fine in embedded_ids(db), what="the next job to run")
    assert poison not in embedded_ids(db)
    assert "the worker process died 3 times while embedding Poison pill" in worker.log()
