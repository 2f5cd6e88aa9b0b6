"""The app's lane: app jobs that wait together are embedded together, each keeping its own job."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from celery import Celery

from db.catalog import input_hash, skill_text
from devstack.fake_ollama import FakeOllama
from tasks import EMBED_SKILL, INTERACTIVE
from tests.backfills import embedded_ids
from tests.databases import TENANT_A, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until


@pytest.fixture
def producer(embedder_env: dict[str, str]) -> Iterator[Celery]:
    """Sends `tasks.embed_skill` exactly as `enqueue_embed_skill` does, keeping each job's id."""
    app = Celery("app", broker=embedder_env["REDIS_URL"], set_as_current=False)
    app.conf.task_send_sent_event = True
    yield app
    app.close()


def publish(producer: Celery, skill_id: str) -> str:
    result = producer.send_task(
        EMBED_SKILL, args=[skill_id], kwargs={"tenant_id": TENANT_A}, queue=INTERACTIVE
    )
    return str(result.id)


def job_results(log: str) -> dict[str, str]:
    """Each job's result as the worker logs it: 'embedded', or the error it failed with."""
    results = dict(re.findall(r"tasks\.embed_skill\[([0-9a-f-]+)\] succeeded in \S+: '(\w+)'", log))
    results.update(re.findall(r"tasks\.embed_skill\[([0-9a-f-]+)\] raised expected: (.+)", log))
    return results


def row_hash(db: Database, skill_id: str) -> object:
    return db.scalar("SELECT input_hash FROM skill_embeddings WHERE skill_id = :s", s=skill_id)


def catalog(db: Database, count: int, label: str = "Imported skill") -> list[str]:
    return db.add_skills(
        TENANT_A, [(f"{label} {i:03d}", f"Imported number {i}") for i in range(count)]
    )


def burst_behind_a_leader(db: Database, ollama: FakeOllama, producer: Celery,
                          skills: list[str]) -> dict[str, str]:  # fmt: skip
    """Queue `skills` as app jobs while the worker's one job (a leader) is with Ollama, so that
    they wait together, as a reviewer's approvals do; returns each skill's job id."""
    leader = db.add_skill(TENANT_A, "Leader skill", "Published just before the burst")
    gate = ollama.hold()
    publish(producer, leader)
    gate.wait_held()
    jobs = {skill: publish(producer, skill) for skill in skills}
    gate.release()
    return jobs


def test_a_burst_of_app_jobs_goes_to_ollama_in_batches_and_each_job_has_its_outcome(
    db: Database, worker: Process, ollama: FakeOllama, producer: Celery
) -> None:
    db.add_tenant(TENANT_A)
    skills = catalog(db, 40)

    jobs = burst_behind_a_leader(db, ollama, producer, skills)

    wait_until(lambda: set(skills) <= embedded_ids(db), what="every skill of the burst")
    wait_until(lambda: set(jobs.values()) <= job_results(worker.log()).keys(), what="every job")
    results = job_results(worker.log())
    assert {results[jobs[skill]] for skill in skills} == {"embedded"}
    # The leader alone, then the burst: 31 companions with the first job, the rest with the
    # next job or the lane's turn ahead; each skill sent once.
    assert ollama.batch_sizes[:2] == [1, 32]
    assert ollama.requests <= 5
    assert ollama.inputs == 41


def test_an_app_job_whose_text_ollama_refuses_fails_alone_and_its_batch_is_embedded(
    db: Database, worker: Process, ollama: FakeOllama, producer: Celery
) -> None:
    db.add_tenant(TENANT_A)
    skills = catalog(db, 6)
    broken = db.add_skill(TENANT_A, "Broken skill", "GLITCH makes the model emit NaN")
    skills.insert(3, broken)
    ollama.nan_for("GLITCH")

    jobs = burst_behind_a_leader(db, ollama, producer, skills)

    fine = set(skills) - {broken}
    wait_until(lambda: fine <= embedded_ids(db), what="the rest of the burst")
    wait_until(lambda: set(jobs.values()) <= job_results(worker.log()).keys(), what="every job")
    results = job_results(worker.log())
    assert "embedding contains NaN or Inf values" in results[jobs[broken]]
    assert {results[jobs[skill]] for skill in fine} == {"embedded"}
    assert broken not in embedded_ids(db)
    assert "embedding contains NaN or Inf values" in worker.log()
    assert "Retrying" not in worker.log()


@pytest.fixture
def fast_worker(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    """A worker whose Ollama slot frees itself soon after a killed process (a short timeout)."""
    env = {**embedder_env, "OLLAMA_TIMEOUT_SECONDS": "1", "EMBED_MAX_DELIVERIES": "3"}
    process = start_worker(env, tmp_path / "worker.log")
    yield process
    process.kill()  # the test is over: its shutdown is not under test


def requests_sent(ollama: FakeOllama) -> list[list[str]]:
    """Each /api/embed request's texts, in order (those answered into a dead connection too)."""
    texts, sent = ollama.texts, []
    for size in ollama.batch_sizes:
        sent.append(texts[:size])
        texts = texts[size:]
    return sent


@pytest.mark.slow
def test_a_skill_in_a_burst_that_kills_the_pool_process_is_isolated_and_given_up(
    db: Database, fast_worker: Process, ollama: FakeOllama, producer: Celery
) -> None:
    worker = fast_worker
    db.add_tenant(TENANT_A)
    skills = catalog(db, 3)
    poison = db.add_skill(TENANT_A, "Poison pill", "POISON kills whoever embeds it")
    skills.insert(1, poison)
    # At the gate before the burst is let go: the burst's first batch, the poison's, is held.
    gate = ollama.hold(match="POISON")
    jobs = burst_behind_a_leader(db, ollama, producer, skills)

    kills = 0
    while kills < 3:
        gate.wait_held()
        assert worker.process is not None
        [child] = psutil.Process(worker.process.pid).children()
        child.kill()  # as the OOM killer would: SIGKILL, no cleanup
        child.wait()
        kills += 1
        if kills < 3:
            gate.release()  # answers into the dead connection
            gate = ollama.hold(match="POISON")
        else:
            gate.release()
    wait_until(lambda: jobs[poison] in job_results(worker.log()), timeout=60,
               what="the poison's job to end")  # fmt: skip

    fine = set(skills) - {poison}
    wait_until(lambda: fine <= embedded_ids(db), what="the rest of the burst")
    assert poison not in embedded_ids(db)
    died = "the worker process died 3 times while embedding Poison pill"
    assert died in job_results(worker.log())[jobs[poison]]
    # The first death took the burst's batch with it; after it the poison went alone, twice,
    # and never again.
    poison_text = skill_text("Poison pill", "POISON kills whoever embeds it")
    with_poison = [sent for sent in requests_sent(ollama) if poison_text in sent]
    assert [len(sent) for sent in with_poison] == [len(skills), 1, 1]


def test_an_edit_that_arrives_while_an_older_job_is_in_a_batch_wins(
    db: Database, worker: Process, ollama: FakeOllama, producer: Celery
) -> None:
    db.add_tenant(TENANT_A)
    others = catalog(db, 3)
    skill = db.add_skill(TENANT_A, "Summarise tickets", "FIRST draft of the text")
    first = ollama.hold(match="FIRST")
    jobs = burst_behind_a_leader(db, ollama, producer, [skill, *others])
    first.wait_held()  # the skill's older text is with Ollama, with its companions

    db.edit_skill(skill, description="Second, final text")
    newer = publish(producer, skill)
    first.release()

    newest = skill_text("Summarise tickets", "Second, final text")
    wait_until(lambda: row_hash(db, skill) == input_hash(newest), what="the newest text's row")
    wait_until(lambda: newer in job_results(worker.log()), what="the newer job")
    results = job_results(worker.log())
    assert results[jobs[skill]] == "superseded"
    assert results[newer] == "embedded"
    assert {results[jobs[other]] for other in others} == {"embedded"}
    assert set(others) <= embedded_ids(db)


def test_a_later_edit_of_a_skill_embedded_ahead_is_embedded_again(
    db: Database, worker: Process, ollama: FakeOllama, producer: Celery,
    embedder_env: dict[str, str],
) -> None:  # fmt: skip
    # A job ahead embeds a waiting job's skill and marks that job done; the job itself is
    # lost (Redis restarted empty). A later edit's job must not take that mark as its own.
    db.add_tenant(TENANT_A)
    leader = db.add_skill(TENANT_A, "Leader skill", "Published first")
    ahead = db.add_skill(TENANT_A, "Ahead skill", "Its job takes the next one along")
    skill = db.add_skill(TENANT_A, "Summarise tickets", "First text")
    first = ollama.hold()
    publish(producer, leader)
    first.wait_held()
    publish(producer, ahead)
    lost = publish(producer, skill)
    second = ollama.hold()
    first.release()
    second.wait_held()  # the job ahead is with Ollama, the skill with it
    client = redis.Redis.from_url(embedder_env["REDIS_URL"])
    [message] = [m for m in client.lrange(INTERACTIVE, 0, -1) if lost.encode() in m]
    client.lrem(INTERACTIVE, 1, message)
    client.close()
    second.release()
    wait_until(lambda: skill in embedded_ids(db), what="the skill embedded ahead of its job")

    db.edit_skill(skill, description="Second text")
    newer = publish(producer, skill)

    newest = skill_text("Summarise tickets", "Second text")
    wait_until(lambda: row_hash(db, skill) == input_hash(newest), what="the later edit's vector")
    wait_until(lambda: newer in job_results(worker.log()), what="the later edit's job")
    assert job_results(worker.log())[newer] == "embedded"


@pytest.mark.slow
def test_a_skill_edited_more_often_than_its_death_cap_is_embedded_each_time(
    db: Database, fast_worker: Process, producer: Celery, embedder_env: dict[str, str]
) -> None:
    # A job counts its skill from its first look and takes the count back after its write: a
    # count left behind by jobs that lived would read as deaths, and the fourth edit would be
    # given up as a skill that kills its process (EMBED_MAX_DELIVERIES is 3 here).
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Summarise tickets", "Edit 0")
    for edit in range(5):
        db.edit_skill(skill, description=f"Edit {edit}")
        job = publish(producer, skill)
        text = skill_text("Summarise tickets", f"Edit {edit}")
        wait_until(lambda t=text: row_hash(db, skill) == input_hash(t), what=f"edit {edit}'s row")
        wait_until(lambda j=job: j in job_results(fast_worker.log()), what=f"edit {edit}'s job")
        assert job_results(fast_worker.log())[job] == "embedded"
    client = redis.Redis.from_url(embedder_env["REDIS_URL"])
    try:
        assert client.hget("embedder:unfinished:app", skill) is None
    finally:
        client.close()
