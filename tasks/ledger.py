"""Per process: the background threads that embed a run's batches, and what they recorded.

No I/O of its own; `tasks.batching` decides what goes in. A batch passes two stages, each on one
thread: fetching its vectors (so Ollama serves one batch at a time, and the client's lock keeps
it from overlapping the current job's call) and writing them, which overlaps the next fetch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")
Key = tuple[str, str]  # (run_id, skill_id)


class BatchLedger(Generic[T]):
    """Batches in flight in this process, and the run items whose outcome it recorded."""

    def __init__(self, *, depth: int = 2, remember: int = 8192, forget_after: float = 30.0) -> None:
        # As many fetchers as batches in flight: one decodes an answer or reads the next batch's
        # skills while the other waits on Ollama (the client's lock keeps requests one at a time).
        self._fetcher = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="batch-fetch")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-write")
        self._lock = threading.Lock()
        self._in_flight: dict[Key, Future[T]] = {}
        self._depth = depth
        self._recorded: OrderedDict[Key, tuple[str, float]] = OrderedDict()
        self._remember = remember
        # An outcome no job came for in this long was confirmed on another host (or its
        # message was lost): it no longer counts as this process running ahead.
        self._forget_after = forget_after
        # One thread claims at a time, so two never both see room for the last batch.
        self.claiming = threading.Lock()

    def submit(
        self,
        run_id: str,
        skill_ids: Iterable[str],
        fetch: Callable[[], U],
        write: Callable[[U], T],
    ) -> Future[T]:
        """Run `fetch`, then `write` with what it returned; the items are in flight till then."""
        keys = [(run_id, skill_id) for skill_id in skill_ids]
        done: Future[T] = Future()

        def fetch_stage() -> None:
            try:
                fetched = fetch()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                self._writer.submit(write_stage, fetched)

        def write_stage(fetched: U) -> None:
            try:
                done.set_result(write(fetched))
            except BaseException as exc:
                done.set_exception(exc)

        with self._lock:
            for key in keys:
                self._in_flight[key] = done
        done.add_done_callback(lambda _: self._forget(keys, done))
        self._fetcher.submit(fetch_stage)
        return done

    def _forget(self, keys: list[Key], future: Future[T]) -> None:
        with self._lock:
            for key in keys:
                if self._in_flight.get(key) is future:
                    del self._in_flight[key]

    def in_flight(self, run_id: str, skill_id: str) -> Future[T] | None:
        with self._lock:
            return self._in_flight.get((run_id, skill_id))

    def has_room(self) -> bool:
        """Fewer batches in flight than the depth: another may be claimed."""
        with self._lock:
            return len(set(self._in_flight.values())) < self._depth

    def close(self) -> None:
        """Claim nothing more (the process is going away); batches in flight finish."""
        with self._lock:
            self._depth = 0

    def remember(self, run_id: str, outcomes: Iterable[tuple[str, str]]) -> None:
        """(skill_id, outcome) now recorded in the database: their own jobs need not ask it."""
        now = time.monotonic()
        with self._lock:
            for skill_id, outcome in outcomes:
                self._recorded[(run_id, skill_id)] = (outcome, now)
            self._prune(now)

    def confirm(self, run_id: str, skill_id: str) -> str | None:
        """The outcome recorded for the item's batch, taken by the item's own job."""
        with self._lock:
            entry = self._recorded.pop((run_id, skill_id), None)
        return None if entry is None else entry[0]

    def unconfirmed(self) -> int:
        """Items recorded here lately whose own job has not come for its outcome yet."""
        with self._lock:
            self._prune(time.monotonic())
            return len(self._recorded)

    def _prune(self, now: float) -> None:
        while self._recorded and (
            len(self._recorded) > self._remember
            or next(iter(self._recorded.values()))[1] < now - self._forget_after
        ):
            self._recorded.popitem(last=False)
