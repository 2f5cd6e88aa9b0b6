"""Celery's consumer, surviving a Redis outage that kombu's clean-up trips over, and sending
task events after the job they describe has gone to the pool process.

When the broker connection is lost, Celery closes it; kombu's Redis channel then restores the
messages the worker held, and when Redis is still away that can fail with an AttributeError
(the transport was already collected) instead of a connection error. Celery takes that for an
unrecoverable error and stops consuming for good. The connection is gone either way, and the
held messages stay with Redis (restored after the visibility timeout), so the consumer goes on
to reconnect.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.consumer import Consumer

from worker.refusing import RefusingConsumer

logger = logging.getLogger(__name__)


# Seconds the worker's buffered task events wait before they go out (on_send_event_buffered).
EVENT_FLUSH_DELAY = 0.005


class EmbedderConsumer(RefusingConsumer, Consumer):
    _flush_due = 0.0  # when the buffered events' flush is due; 0: none scheduled
    hub: Any  # set by Celery, untyped in its stubs
    event_dispatcher: Any

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            self.connection = None
            logger.warning("Closing the lost broker connection failed (%s): reconnecting", error)

    def on_send_event_buffered(self) -> None:  # type: ignore[override]  # the stub's is wrong
        # Celery flushes task events at the top of the event loop's next turn, before that
        # turn writes the job to the pool process: a job waited for the publish of its own
        # "task-received" (0.5 ms of a lone publish here, bench/README.md). A timer lets the
        # write go first, and 5 ms puts the publish in the job's wait for Ollama rather than
        # beside its first steps on the cores. The events keep the time they were sent.
        if self.hub is None:
            return
        now = time.monotonic()
        if now < self._flush_due + 1.0:  # one is on its way (a timer lost in a restart: 1 s)
            return
        self._flush_due = now + EVENT_FLUSH_DELAY
        self.hub.call_later(EVENT_FLUSH_DELAY, self._flush_buffered)

    def _flush_buffered(self) -> None:
        self._flush_due = 0.0
        if self.event_dispatcher:
            self.event_dispatcher.flush()
