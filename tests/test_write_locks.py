"""An app job's write against what commits while it waits for its locks, in this process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from db import staging
from db.catalog import input_hash, skill_text
from db.sql import unscoped
from devstack.fake_ollama import FakeOllama
from tasks import switch as model_switch
from tasks.app_lane import Together, fetch_together, write_together
from tasks.embedding import (
    Batch,
    Embedded,
    EmbedRequest,
    Outcome,
    Result,
    fetch_vectors,
    load_and_decide,
    write_vectors,
)
from tasks.retry import ModelSwitched
from tasks.runtime import Runtime
from tests.databases import APP_ROLE, TENANT_A, Database
from tests.waiting import wait_until
from worker.settings import Settings

NEW = "embeddinggemma"


@pytest.fixture
def rt(db: Database, redis_url: str, ollama: FakeOllama) -> Iterator[Runtime]:
    ollama.models = {"nomic-embed-text", NEW}
    runtime = Runtime(Settings(database_url=db.app_url, redis_url=redis_url,
                               ollama_url=ollama.url))  # fmt: skip
    yield runtime
    runtime.engine.dispose()


def fetched(rt: Runtime, skill: str) -> Batch:
    """A lone app job's batch, decided and given its vector, not yet written."""
    with unscoped(rt.engine) as conn:
        batch = load_and_decide(rt, conn, [EmbedRequest(skill, TENANT_A)])
    fetch_vectors(rt, batch, urgent=True)
    return batch


def write_in_thread(rt: Runtime, batch: Batch) -> Callable[[], list[Result]]:
    """Start the batch's write; a call that waits for it and returns its results."""
    out: list[Any] = []

    def write() -> None:
        try:
            with unscoped(rt.engine) as conn:
                out.append(write_vectors(rt, conn, batch))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()

    def results() -> list[Result]:
        thread.join(30)
        assert out, "the write did not end"
        if isinstance(out[0], BaseException):
            raise out[0]
        return list(out[0])

    return results


def waits_on(db: Database, event: str) -> bool:
    """Whether a backend of the worker's role waits for a lock of this kind."""
    return bool(db.scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = :role"
                          " AND wait_event_type = 'Lock' AND wait_event = :event",
                          role=APP_ROLE, event=event))  # fmt: skip


def holds_advisory_lock(db: Database) -> bool:
    return bool(db.scalar("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                          " WHERE a.usename = :role AND l.locktype = 'advisory' AND l.granted",
                          role=APP_ROLE))  # fmt: skip


def test_an_edit_committed_while_the_write_waits_for_the_skills_lock_wins(
    db: Database, rt: Runtime
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    batch = fetched(rt, skill)

    with db.admin.connect() as holder:
        # Another writer of this skill's embedding holds its lock.
        holder.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                       {"k": f"{TENANT_A}/{skill}"})  # fmt: skip
        results = write_in_thread(rt, batch)
        wait_until(lambda: waits_on(db, "advisory"), what="the write to wait for the lock")
        db.edit_skill(skill, description="Flag risky changes and missing tests")
        holder.commit()

    assert results() == [Embedded(Outcome.SUPERSEDED, "Review pull requests")]
    assert db.embedding_rows() == []


def test_a_write_clears_the_skills_failure_only_when_it_writes(db: Database, rt: Runtime) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    edited = db.add_skill(TENANT_A, "Summarise notes", "Into action items")
    for failed in (skill, edited):
        db.execute("INSERT INTO embedding_failures (skill_id, tenant_id, reason)"
                   " VALUES (:s, :t, 'Ollama is down')", s=failed, t=TENANT_A)  # fmt: skip
    batch = fetched(rt, skill)
    other = fetched(rt, edited)
    db.edit_skill(edited, description="Into decisions")

    assert write_in_thread(rt, batch)() == [Embedded(Outcome.EMBEDDED, "Review pull requests")]
    assert write_in_thread(rt, other)() == [Embedded(Outcome.SUPERSEDED, "Summarise notes")]
    assert [r.skill_id for r in db.rows("SELECT skill_id FROM embedding_failures")] == [edited]
    [row] = db.embedding_rows()
    assert row.input_hash == input_hash(skill_text("Review pull requests", "Flag risky changes"))


def switching(db: Database, rt: Runtime) -> staging.Switch:
    """TENANT_A's switch to NEW with its staging run, as `switch-model` starts it."""
    with rt.engine.begin() as conn:
        staging.add_switch(conn, TENANT_A, model=NEW, dimensions=768,
                           from_model="nomic-embed-text", position=0)  # fmt: skip
        [switch] = staging.list_switches(conn)
        staging.start_run(conn, switch, staging.new_run_id())
        [switch] = staging.list_switches(conn)
    return switch


def test_a_swap_committed_while_the_write_waits_is_seen_by_it_whole(
    db: Database, rt: Runtime
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    switching(db, rt)
    batch = fetched(rt, skill)

    with db.admin.connect() as swap:
        # What db.staging.swap does, held open: the settings row first, then the switch gone.
        swap.execute(sa.text("UPDATE site_settings SET ollama_model = :m WHERE tenant_id = :t"),
                     {"m": NEW, "t": TENANT_A})  # fmt: skip
        swap.execute(sa.text("DELETE FROM embedding_switches"))
        results = write_in_thread(rt, batch)
        wait_until(lambda: waits_on(db, "transactionid"), what="the write to wait for the swap")
        # The skill's lock is held already: the write never holds the settings row while it
        # waits for a skill (a staged write holds that, and waits for the swap's switch row).
        assert holds_advisory_lock(db)
        swap.commit()

    [result] = results()
    assert isinstance(result, ModelSwitched)
    assert db.embedding_rows() == []


def test_an_app_jobs_live_write_is_staged_for_a_switch_under_way_through_its_hook(
    db: Database, rt: Runtime, ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    switching(db, rt)
    model_switch.switching.forget()  # this process's last look at the switches predates this one

    # The app lane's own steps: after its live write, the switch's hook stages the new model's.
    together = Together(EmbedRequest(skill, TENANT_A), [])
    batch = fetch_together(rt, together)
    result = write_together(rt, together, batch)
    assert result == Embedded(Outcome.EMBEDDED, "Review pull requests")

    [staged] = db.rows("SELECT skill_id, model_name FROM staged_embeddings")
    assert (staged.skill_id, staged.model_name) == (skill, NEW)
    assert ollama.requests == 2
