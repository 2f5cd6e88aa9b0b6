"""The SQL that decides who embeds a run's item, with two connections racing (db/runs.py)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from db import claims, runs
from tests.databases import APP_ROLE, Database


def ids(claimed: list[tuple[str, str]]) -> list[str]:
    return [skill_id for skill_id, _ in claimed]


def queue_order(db: Database, run_id: str) -> list[str]:
    rows = db.rows(
        "SELECT skill_id FROM embedding_run_items WHERE run_id = :id ORDER BY position", id=run_id
    )
    return [str(row.skill_id) for row in rows]


def test_two_claimers_never_get_the_same_item(engine: sa.Engine, pending_run: str) -> None:
    with engine.connect() as first, engine.connect() as second, engine.connect() as third:
        a = ids(claims.claim_items(first, pending_run, 4))
        b = ids(claims.claim_items(second, pending_run, 4))
        c = ids(claims.claim_items(third, pending_run, 4))

    assert len(a) == len(b) == 4
    assert len(c) == 2  # what neither had taken
    assert len(set(a) | set(b) | set(c)) == 10


def test_a_claim_ends_with_its_transaction_and_the_items_are_claimed_again(
    db: Database, engine: sa.Engine, pending_run: str
) -> None:
    with engine.connect() as first:
        taken = ids(claims.claim_items(first, pending_run, 3))
        first.rollback()  # a batch that failed: nothing recorded
        with engine.connect() as second:
            again = ids(claims.claim_items(second, pending_run, 3))

    assert taken == again == queue_order(db, pending_run)[:3]


def test_a_claim_held_by_a_connection_that_was_cut_is_free_at_once(
    db: Database, engine: sa.Engine, pending_run: str
) -> None:
    first = engine.connect()
    taken = ids(claims.claim_items(first, pending_run, 3))
    db.scalar(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
        " WHERE usename = :role AND state = 'idle in transaction'",
        role=APP_ROLE,
    )

    with engine.connect() as second:
        assert ids(claims.claim_items(second, pending_run, 3)) == taken
    with pytest.raises(OperationalError):
        runs.record_outcomes(first, pending_run, [(taken[0], "embedded", None)])
    first.close()


def test_a_job_claims_a_batch_led_by_its_own_item_or_nothing_while_another_holds_it(
    db: Database, engine: sa.Engine, pending_run: str
) -> None:
    order = queue_order(db, pending_run)
    with engine.connect() as batch, engine.connect() as job:
        assert ids(claims.claim_items(batch, pending_run, 3)) == order[:3]
        assert claims.claim_items(job, pending_run, 3, including=order[1]) == []
        led = ids(claims.claim_items(job, pending_run, 3, including=order[7]))

    assert led == [order[7], order[3], order[4]]


def test_waiting_for_an_item_returns_what_its_batch_recorded(
    engine: sa.Engine, pending_run: str, db: Database
) -> None:
    skill = queue_order(db, pending_run)[0]
    batch = engine.connect()
    claims.claim_items(batch, pending_run, 1)
    seen: list[tuple[str | None, str | None] | None] = []
    waiter = threading.Thread(
        target=lambda: seen.append(_wait(engine, pending_run, skill)), daemon=True
    )
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "the waiter did not wait for the batch that holds the item"

    runs.record_outcomes(batch, pending_run, [(skill, "embedded", None)])
    batch.commit()
    waiter.join(10)

    assert seen == [("embedded", None)]


def _wait(engine: sa.Engine, pending_run: str, skill: str) -> tuple[str | None, str | None] | None:
    with engine.begin() as conn:
        return claims.wait_for_item(conn, pending_run, skill, timeout_seconds=10)


def test_an_outcome_is_recorded_once_when_two_recorders_race(
    db: Database, engine: sa.Engine, pending_run: str
) -> None:
    skill = queue_order(db, pending_run)[0]
    results: dict[str, runs.Recorded] = {}

    def record(name: str, conn: sa.Connection, outcome: str) -> None:
        results[name] = runs.record_outcomes(conn, pending_run, [(skill, outcome, None)])
        conn.commit()

    with engine.connect() as first, engine.connect() as second:
        runs.record_outcomes(first, pending_run, [])  # both transactions are open
        record("first", first, "embedded")
        late = threading.Thread(target=record, args=("second", second, "failed"))
        late.start()
        late.join(10)

    assert results["first"].skill_ids == [skill]
    assert results["second"].skill_ids == []
    assert db.scalar("SELECT outcome FROM embedding_run_items WHERE skill_id = :s", s=skill) == (
        "embedded"
    )
    assert (
        db.scalar("SELECT embedded + failed FROM embedding_runs WHERE id = :id", id=pending_run)
        == 1
    )


def test_a_run_finishes_exactly_once_when_its_last_items_are_recorded_side_by_side(
    db: Database, engine: sa.Engine, pending_run: str
) -> None:
    order = queue_order(db, pending_run)
    with engine.begin() as conn:
        runs.record_outcomes(conn, pending_run, [(s, "embedded", None) for s in order[:8]])
    finished: list[bool] = []
    barrier = threading.Barrier(2)

    def record(skill: str) -> None:
        with engine.connect() as conn:
            claims.claim_items(conn, pending_run, 1, including=skill)
            barrier.wait()
            finished.append(runs.record_outcomes(conn, pending_run, [(skill, "embedded", None)])
                            .finished)  # fmt: skip
            conn.commit()

    threads = [threading.Thread(target=record, args=(skill,)) for skill in order[8:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(finished) == [False, True]
    assert db.scalar("SELECT finished_at IS NOT NULL FROM embedding_runs WHERE id = :id",
                     id=pending_run)  # fmt: skip


def test_a_run_whose_pending_items_are_all_held_is_not_offered_for_recovery(
    engine: sa.Engine, pending_run: str
) -> None:
    with engine.connect() as holder:
        claims.claim_items(holder, pending_run, 9)
        with engine.begin() as conn:
            assert claims.runs_with_free_items(conn) == [(pending_run, False)]
    with engine.connect() as holder:
        claims.claim_items(holder, pending_run, 10)
        with engine.begin() as conn:
            assert claims.runs_with_free_items(conn) == []
