"""`tasks.embed_skill` through a real worker, real PostgreSQL and Redis, and the fake Ollama."""

from __future__ import annotations

import json
import time

import pytest

from db.catalog import input_hash, skill_text
from devstack.fake_ollama import FakeOllama, vector_for
from tasks import enqueue_embed_skill
from tests.databases import TENANT_A, TENANT_B, Database
from tests.processes import Process
from tests.waiting import wait_until


def stored_vector(db: Database, skill_id: str) -> list[float] | None:
    value = db.scalar(
        "SELECT embedding::text FROM skill_embeddings WHERE skill_id = :s", s=skill_id
    )
    return None if value is None else [float(x) for x in json.loads(str(value))]


def row_hash(db: Database, skill_id: str) -> object:
    return db.scalar("SELECT input_hash FROM skill_embeddings WHERE skill_id = :s", s=skill_id)


def assert_same_vector(actual: list[float] | None, expected: list[float]) -> None:
    assert actual is not None
    assert actual == pytest.approx(expected, abs=1e-6)


@pytest.fixture
def tenant(db: Database) -> str:
    db.add_tenant(TENANT_A)
    return TENANT_A


def enqueue(redis_url: str, skill_id: str, tenant_id: str | None = TENANT_A) -> None:
    assert enqueue_embed_skill(skill_id, tenant_id, broker_url=redis_url)


def test_a_published_skill_gets_its_row(
    db: Database, tenant: str, worker: Process, redis_url: str
) -> None:
    skill = db.add_skill(tenant, "Review pull requests", "Flag risky changes before merge")

    enqueue(redis_url, skill)

    text = skill_text("Review pull requests", "Flag risky changes before merge")
    wait_until(lambda: stored_vector(db, skill), what="the embedding row")
    [row] = db.embedding_rows()
    assert row.tenant_id == tenant
    assert row.model_name == "nomic-embed-text"
    assert row.dimensions == 768
    assert row.input_hash == input_hash(text)
    assert_same_vector(stored_vector(db, skill), vector_for(text))
    wait_until(lambda: "Embedded: Review pull requests" in worker.log(), what="the log line")


def test_an_edited_skill_gets_a_refreshed_vector(
    db: Database, tenant: str, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    skill = db.add_skill(tenant, "Summarise meeting notes", "Into action items")
    enqueue(redis_url, skill)
    wait_until(lambda: row_hash(db, skill), what="the first row")
    first_id = db.scalar("SELECT id FROM skill_embeddings")

    db.edit_skill(skill, description="Into decisions, owners and dates")
    enqueue(redis_url, skill)

    new_text = skill_text("Summarise meeting notes", "Into decisions, owners and dates")
    wait_until(lambda: row_hash(db, skill) == input_hash(new_text), what="the refreshed row")
    assert_same_vector(stored_vector(db, skill), vector_for(new_text))
    assert db.scalar("SELECT id FROM skill_embeddings") == first_id
    assert ollama.requests == 2


def test_an_unchanged_skill_is_not_sent_to_ollama_again(
    db: Database, tenant: str, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    skill = db.add_skill(tenant, "Draft a renewal email", "For a customer up for renewal")
    enqueue(redis_url, skill)
    wait_until(lambda: row_hash(db, skill), what="the row")

    enqueue(redis_url, skill)

    wait_until(lambda: "Unchanged: Draft a renewal email" in worker.log(), what="unchanged")
    assert ollama.requests == 1


def test_an_unpublished_skill_loses_its_row(
    db: Database, tenant: str, worker: Process, redis_url: str
) -> None:
    skill = db.add_skill(tenant, "Triage support tickets", "By urgency and product area")
    enqueue(redis_url, skill)
    wait_until(lambda: row_hash(db, skill), what="the row")

    db.edit_skill(skill, status="changes_requested")
    enqueue(redis_url, skill)

    wait_until(lambda: row_hash(db, skill) is None, what="the row to go")
    wait_until(lambda: "Removed: Triage support tickets" in worker.log(), what="removed")


def test_a_draft_is_never_embedded(
    db: Database, tenant: str, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    skill = db.add_skill(tenant, "Half-written idea", status="draft")

    enqueue(redis_url, skill)

    wait_until(lambda: "Removed: Half-written idea" in worker.log(), what="the job")
    assert ollama.requests == 0
    assert row_hash(db, skill) is None


def test_an_unknown_id_fails_clearly_and_the_worker_lives_on(
    db: Database, tenant: str, worker: Process, redis_url: str
) -> None:
    enqueue(redis_url, "no-such-skill")
    skill = db.add_skill(tenant, "Write release notes", "From merged pull requests")
    enqueue(redis_url, skill)

    wait_until(lambda: row_hash(db, skill), what="the next job to succeed")
    # The unknown id's job may have sent the next skill along with its own look: wait for it.
    wait_until(lambda: "no skill 'no-such-skill' in tenant" in worker.log(), what="the failure")
    log = worker.log()
    assert "Traceback" not in log
    assert worker.process is not None
    assert worker.process.poll() is None


def test_a_disabled_tenant_gets_no_embeddings(
    db: Database, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_B, enabled=False)
    skill = db.add_skill(TENANT_B, "Forecast quarterly revenue", "From the pipeline")

    enqueue(redis_url, skill, TENANT_B)

    wait_until(lambda: "Disabled: Forecast quarterly revenue" in worker.log(), what="the job")
    assert ollama.requests == 0


def test_ollama_failing_three_times_then_answering_still_embeds(
    db: Database, tenant: str, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    ollama.fail_next(3, 500)
    skill = db.add_skill(tenant, "Explain a SQL query plan", "In plain words")

    enqueue(redis_url, skill)

    wait_until(lambda: row_hash(db, skill), what="the row after retries")
    assert ollama.requests == 4
    assert worker.log().count("Retrying") == 3


def test_a_model_that_is_not_pulled_fails_once_with_what_to_do(
    db: Database, tenant: str, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    ollama.models = set()
    skill = db.add_skill(tenant, "Plan a sprint", "From the backlog")

    enqueue(redis_url, skill)

    wait_until(lambda: "ollama pull nomic-embed-text" in worker.log(), what="the failure")
    time.sleep(0.5)
    assert ollama.requests == 1
    assert "Retrying" not in worker.log()
    assert row_hash(db, skill) is None


@pytest.mark.parametrize(
    ("kind", "message"),
    [("dimensions", "vector of 769 dimensions"), ("nan", "NaN or Inf")],
)
def test_a_bad_answer_writes_nothing(
    db: Database,
    tenant: str,
    worker: Process,
    redis_url: str,
    ollama: FakeOllama,
    kind: str,
    message: str,
) -> None:
    ollama.corrupt_next(1, kind)
    skill = db.add_skill(tenant, "Tag customer feedback", "By theme and sentiment")

    enqueue(redis_url, skill)

    wait_until(lambda: message in worker.log(), what="the rejection")
    assert row_hash(db, skill) is None
    assert "Retrying" not in worker.log()


@pytest.mark.parametrize(
    ("kind", "line"),
    [
        ("count", "Ollama returned 0 vectors for 1 inputs"),
        ("html", "answered 200 with text/html, not JSON"),
    ],
)
def test_a_malformed_answer_is_retried_and_the_skill_embedded(
    db: Database,
    tenant: str,
    worker: Process,
    redis_url: str,
    ollama: FakeOllama,
    kind: str,
    line: str,
) -> None:
    if kind == "html":
        ollama.proxy_page_next(2)  # a proxy in front of Ollama answers with its own page
    else:
        ollama.corrupt_next(2, kind)
    skill = db.add_skill(tenant, "Tag customer feedback", "By theme and sentiment")

    enqueue(redis_url, skill)

    text = skill_text("Tag customer feedback", "By theme and sentiment")
    wait_until(lambda: row_hash(db, skill) == input_hash(text), what="the embedding row")
    wait_until(lambda: "Embedded: Tag customer feedback" in worker.log(), what="the job's line")
    retries = [entry for entry in worker.log().splitlines() if "Retrying" in entry]
    assert len(retries) == 2
    assert all(line in entry for entry in retries)
    assert "Failed" not in worker.log()
    assert "Traceback" not in worker.log()


def test_two_jobs_for_one_skill_leave_the_newest_text(
    db: Database, tenant: str, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    ollama.request_latency = 0.3
    skill = db.add_skill(tenant, "Onboard a new hire", "First-week checklist")
    enqueue(redis_url, skill)
    wait_until(lambda: ollama.in_flight, what="the first call to be in flight")

    db.edit_skill(skill, description="First-month plan with a buddy")
    enqueue(redis_url, skill)

    newest = skill_text("Onboard a new hire", "First-month plan with a buddy")
    wait_until(lambda: row_hash(db, skill) == input_hash(newest), what="the newest text")
    wait_until(lambda: worker.log().count(": Onboard a new hire") >= 2, what="both jobs")
    assert row_hash(db, skill) == input_hash(newest)
    assert_same_vector(stored_vector(db, skill), vector_for(newest))
    assert db.scalar("SELECT count(*) FROM skill_embeddings") == 1


def test_ollama_never_sees_two_requests_at_once(
    db: Database, tenant: str, worker: Process, redis_url: str, ollama: FakeOllama
) -> None:
    ollama.request_latency = 0.02
    skills = [db.add_skill(tenant, f"Skill number {i}", "Some description") for i in range(15)]

    for skill in skills:
        enqueue(redis_url, skill)

    wait_until(lambda: db.scalar("SELECT count(*) FROM skill_embeddings") == 15, what="all rows")
    assert ollama.max_concurrent == 1


def test_a_job_without_a_tenant_finds_the_skills_own(
    db: Database, worker: Process, redis_url: str
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    skill = db.add_skill(TENANT_B, "Reconcile invoices", "Against purchase orders")

    enqueue(redis_url, skill, None)

    wait_until(lambda: row_hash(db, skill), what="the row")
    assert db.scalar("SELECT tenant_id FROM skill_embeddings") == TENANT_B


def test_a_job_naming_the_wrong_tenant_writes_nothing(
    db: Database, worker: Process, redis_url: str
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    shared = db.add_skill(TENANT_B, "Shared glossary", "Terms", visibility="global_approved")

    enqueue(redis_url, shared, TENANT_A)

    wait_until(lambda: "belongs to tenant" in worker.log(), what="the refusal")
    assert db.scalar("SELECT count(*) FROM skill_embeddings") == 0


def test_enqueue_with_redis_down_returns_false_fast() -> None:
    from devstack.ports import free_port

    started = time.perf_counter()
    queued = enqueue_embed_skill("any", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    elapsed = time.perf_counter() - started

    assert queued is False
    assert elapsed < 0.5


def test_enqueue_with_an_unroutable_redis_host_returns_false_fast() -> None:
    started = time.perf_counter()
    # TEST-NET-1: packets go nowhere, so only a connect timeout can end the attempt.
    queued = enqueue_embed_skill("any", broker_url="redis://192.0.2.1:6379/0")
    elapsed = time.perf_counter() - started

    assert queued is False
    assert elapsed < 0.5
