"""Per process: the one background thread that embeds a run's batches, and what it recorded.

No I/O of its own; `tasks.batching` decides what goes in. One thread, so batches run one after
another, and the Ollama client's lock keeps them from overlapping any other call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
Key = tuple[str, str]  # (run_id, skill_id)


class BatchLedger(Generic[T]):
    """Batches in flight in this process, and the run items whose outcome it recorded."""

    def __init__(self, *, remember: int = 8192) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-batch")
        self._lock = threading.Lock()
        self._in_flight: dict[Key, Future[T]] = {}
        self._recorded: OrderedDict[Key, str] = OrderedDict()
        self._remember = remember

    def submit(self, run_id: str, skill_ids: Iterable[str], work: Callable[[], T]) -> Future[T]:
        """Run `work` on the background thread; its items count as in flight until it ends."""
        keys = [(run_id, skill_id) for skill_id in skill_ids]
        with self._lock:
            future = self._executor.submit(work)
            for key in keys:
                self._in_flight[key] = future
        future.add_done_callback(lambda _: self._forget(keys, future))
        return future

    def _forget(self, keys: list[Key], future: Future[T]) -> None:
        with self._lock:
            for key in keys:
                if self._in_flight.get(key) is future:
                    del self._in_flight[key]

    def in_flight(self, run_id: str, skill_id: str) -> Future[T] | None:
        with self._lock:
            return self._in_flight.get((run_id, skill_id))

    def idle(self) -> bool:
        """No batch is waiting or running."""
        with self._lock:
            return not self._in_flight

    def remember(self, run_id: str, outcomes: Iterable[tuple[str, str]]) -> None:
        """(skill_id, outcome) now recorded in the database: their own jobs need not ask it."""
        with self._lock:
            for skill_id, outcome in outcomes:
                self._recorded[(run_id, skill_id)] = outcome
            while len(self._recorded) > self._remember:
                self._recorded.popitem(last=False)

    def recorded(self, run_id: str, skill_id: str) -> str | None:
        with self._lock:
            return self._recorded.get((run_id, skill_id))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
