"""The batch loop's control flow, with stub stages: claim for real, fetch and write stubbed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from db import runs
from tasks import loops
from tasks.embedding import Embedded, Outcome, Result
from tasks.loops import RunBatch, run_batches
from tasks.runtime import Runtime
from tests.databases import Database
from tests.test_claims import queue_order
from tests.waiting import wait_until
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
    write_began, second_fetch_done = threading.Event(), threading.Event()
    fetched: list[int] = []
    overlapped: list[bool] = []

    def fetch(batch: RunBatch) -> bool:
        fetched.append(len(batch.skill_ids))
        assert batch.on_sent is not None
        batch.on_sent()  # the request is out; its answer is "with the model" until we return
        if len(fetched) == 2:
            # The first batch's write runs meanwhile: the loop deadlocks if it serialises.
            overlapped.append(write_began.wait(10))
            second_fetch_done.set()
        return True

    def write(batch: RunBatch) -> list[Result]:
        if not write_began.is_set():
            write_began.set()
            second_fetch_done.wait(10)
        return write_all(batch)

    loop(rt, pending_run, fetch=fetch, write=write)

    assert overlapped == [True]


def test_the_next_claim_and_the_last_write_start_once_a_request_is_out(
    rt: Runtime, pending_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims: list[str] = []
    real_claim = loops.claim

    def counted_claim(*args: Any, **kwargs: Any) -> RunBatch | None:
        claims.append(pending_run)
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(loops, "claim", counted_claim)
    monkeypatch.setattr(loops, "SEND_GRACE_SECONDS", 60.0)  # no send here takes its slot long
    write_began = threading.Event()
    seen: dict[str, object] = {}

    def fetch(batch: RunBatch) -> bool:
        if "first" not in seen:
            seen["first"] = True  # its request "fails to leave": the loop goes on after it
        elif "second" not in seen:
            seen["second"] = True
            # The request is still being sent: the first batch's write and the third claim
            # must not start and take the process's GIL from it.
            seen["claims while sending"] = len(claims)
            seen["write while sending"] = write_began.wait(0.3)
            seen["claims after 0.3 s"] = len(claims)
            assert batch.on_sent is not None
            batch.on_sent()  # out: both go while the model computes
            seen["write once sent"] = write_began.wait(10)
            wait_until(lambda: len(claims) == 3, 10, "the third claim")
        return True

    def write(batch: RunBatch) -> list[Result]:
        write_began.set()
        return write_all(batch)

    loop(rt, pending_run, fetch=fetch, write=write)

    assert seen["claims while sending"] == seen["claims after 0.3 s"] == 2
    assert seen["write while sending"] is False
    assert seen["write once sent"] is True


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
