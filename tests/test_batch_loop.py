"""The batch loop's control flow, with stub stages: claim for real, fetch and write stubbed."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from db import runs
from tasks.embedding import Embedded, Outcome, Result
from tasks.loops import RunBatch, run_batches
from tasks.runtime import Runtime
from tests.databases import Database
from tests.test_claims import queue_order
from worker.settings import Settings


@pytest.fixture
def rt(db: Database, redis_url: str) -> Runtime:
    return Runtime(Settings(database_url=db.app_url, redis_url=redis_url, embed_batch_size=4))


def write_all(batch: RunBatch) -> list[Result]:
    """What the real stage does, minus the vectors: record every item, commit, end."""
    runs.record_outcomes(batch.conn, batch.run_id, [(s, "embedded", None) for s in
                                                       batch.skill_ids])  # fmt: skip
    batch.conn.commit()
    batch.end()
    return [Embedded(Outcome.EMBEDDED, s) for s in batch.skill_ids]


def noting(fetched: list[list[str]]) -> Callable[[RunBatch], bool]:
    """A fetch that notes each batch's items and gets all their vectors."""

    def fetch(batch: RunBatch) -> bool:
        fetched.append(batch.skill_ids)
        return True

    return fetch


def loop(rt: Runtime, pending_run: str, fetch: Callable[[RunBatch], bool],
         write: Callable[[RunBatch], list[Result]] = write_all,
         keep_going: Callable[[], bool] = lambda: True) -> None:  # fmt: skip
    run_batches(rt, pending_run, force=False, keep_going=keep_going, fetch=fetch, write=write)


def test_the_loop_claims_batches_in_queue_order_until_no_item_is_free(
    rt: Runtime, pending_run: str, db: Database
) -> None:
    fetched: list[list[str]] = []

    loop(rt, pending_run, fetch=noting(fetched))

    order = queue_order(db, pending_run)
    assert fetched == [order[:4], order[4:8], order[8:]]
    assert db.scalar("SELECT finished_at IS NOT NULL FROM embedding_runs WHERE id = :id",
                     id=pending_run)  # fmt: skip


def test_the_loop_stops_after_a_batch_that_met_a_transient_error(
    rt: Runtime, pending_run: str, db: Database
) -> None:
    fetched: list[list[str]] = []

    def fetch(batch: RunBatch) -> bool:
        fetched.append(batch.skill_ids)
        return len(fetched) < 2  # Ollama went down during the second batch

    loop(rt, pending_run, fetch=fetch)

    assert len(fetched) == 2
    assert db.scalar("SELECT count(*) FROM embedding_run_items WHERE outcome IS NULL") == 2


def test_the_loop_claims_nothing_more_once_the_process_stops(
    rt: Runtime, pending_run: str, db: Database
) -> None:
    fetched: list[list[str]] = []

    loop(rt, pending_run, fetch=noting(fetched),
         keep_going=lambda: not fetched)  # fmt: skip

    assert len(fetched) == 1
    assert db.scalar("SELECT count(*) FROM embedding_run_items WHERE outcome IS NULL") == 6


def test_a_batch_is_written_while_the_next_one_is_fetched(rt: Runtime, pending_run: str) -> None:
    second_fetch = threading.Event()
    overlapped: list[bool] = []

    def fetch(batch: RunBatch) -> bool:
        if batch.skill_ids and overlapped:
            second_fetch.set()
        return True

    def write(batch: RunBatch) -> list[Result]:
        if not overlapped:
            overlapped.append(True)
            # The first write waits for the second fetch: the loop deadlocks if it serialises.
            overlapped[0] = second_fetch.wait(10)
        return write_all(batch)

    loop(rt, pending_run, fetch=fetch, write=write)

    assert overlapped == [True]


def test_a_write_that_fails_leaves_its_items_free_and_stops_the_loop(
    rt: Runtime, pending_run: str, db: Database
) -> None:
    def write(batch: RunBatch) -> list[Result]:
        batch.end()  # rolled back: nothing recorded
        raise RuntimeError("the write failed")

    with pytest.raises(RuntimeError):
        loop(rt, pending_run, fetch=lambda batch: True, write=write)

    assert db.scalar("SELECT count(*) FROM embedding_run_items WHERE outcome IS NULL") == 10
    loop(rt, pending_run, fetch=lambda batch: True)
    assert db.scalar("SELECT count(*) FROM embedding_run_items WHERE outcome IS NULL") == 0
