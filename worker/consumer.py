"""Celery's consumer, back within about a second of Redis's return whatever the outage's
length, surviving a Redis outage that kombu's clean-up trips over, and sending task events
after the job they describe has gone to the pool process.

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
from collections.abc import Callable
from typing import Any, ClassVar

import kombu
from celery.worker.consumer import Consumer
from celery.worker.consumer.gossip import Gossip as CeleryGossip
from celery.worker.state import maybe_shutdown
from kombu.common import ignore_errors

from worker.refusing import RefusingConsumer

logger = logging.getLogger(__name__)


# Seconds the worker's buffered task events wait before they go out (on_send_event_buffered).
EVENT_FLUSH_DELAY = 0.005
# Seconds between attempts to reach a broker that is away: 0.2 s after the loss, then 0.2 s
# more each attempt, never more than 1 s apart. Celery's own wait grows by 2 s an attempt up to
# 30 s, so a worker came back up to that long after Redis did; an attempt on a Redis that is down
# is one refused (or timed out) connection, cheap enough to make each second.
RECONNECT_FIRST = RECONNECT_STEP = 0.2
RECONNECT_MOST = 1.0
# While the broker stays away, a line when it is first missed and one each this many seconds.
RECONNECT_LOG_INTERVAL = 30.0


class Gossip(CeleryGossip):
    """Celery's gossip, quiet when it is stopped after a lost connection (WORKER_MINGLE_GOSSIP).

    Celery drops the consumer's connection before it restarts the steps, and its gossip then
    cancels its consumer with that connection's errors to ignore: a cancel that fails on the
    lost socket raised an AttributeError and logged a traceback. The consumer knows the same
    errors.
    """

    def _close(self, c: Any, cancel_consumers: bool = True) -> None:
        channels: set[Any] = set()
        for consumer in self.consumers or []:
            if cancel_consumers:
                ignore_errors(c, consumer.cancel)
            if consumer.channel:
                channels.add(consumer.channel)
        for channel in channels:
            ignore_errors(c, channel.close)


class Reconnecting:
    """The lines of one stretch without the broker: its first miss, then one an interval."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.since: float | None = None
        self.attempts = 0
        self._next_line = 0.0

    def failed(self, exc: Exception, interval: float) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.since is None:
            self.since = now
            self._next_line = now + RECONNECT_LOG_INTERVAL
            logger.error(
                "Cannot reach the broker at %s (%s): trying again, at most %.0f s apart",
                self.uri, _first_line(exc), RECONNECT_MOST,
            )  # fmt: skip
        elif now >= self._next_line:
            self._next_line = now + RECONNECT_LOG_INTERVAL
            logger.error(
                "Still cannot reach the broker at %s after %.0f s (%s): trying again",
                self.uri, now - self.since, _first_line(exc),
            )  # fmt: skip
        else:
            logger.debug("Broker attempt %d failed: %r", self.attempts, exc)

    def back(self) -> None:
        if self.since is not None:
            logger.info(
                "The broker at %s answers again, after %.1f s away (%d attempts)",
                self.uri, time.monotonic() - self.since, self.attempts + 1,
            )  # fmt: skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")


class EmbedderConsumer(RefusingConsumer, Consumer):
    """The worker's consumer, without Celery's mingle and gossip (see NeighbourlyConsumer)."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc,valid-type]  # stubs: an attribute
        default_steps = [
            "worker.consumer:Gossip" if step == "celery.worker.consumer.gossip:Gossip" else step
            for step in Consumer.Blueprint.default_steps
        ]

    # Mingle asks every other worker for its revoked ids and clock, waiting a second for the
    # answers at start and at each reconnect; gossip follows the others' events for elections.
    # This worker uses neither: its coordination is in Redis and PostgreSQL.
    without_neighbours: ClassVar[bool] = True
    _flush_due = 0.0  # when the buffered events' flush is due; 0: none scheduled
    hub: Any  # set by Celery, untyped in its stubs
    event_dispatcher: Any

    def __init__(
        self,
        on_task_request: Callable[..., Any],
        *,
        worker_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Celery hands the command line's --without-mingle / --without-gossip to the steps
        # here; a worker started with neither flag gets this class's choice.
        options = dict(worker_options or {})
        if self.without_neighbours:
            options.update(without_mingle=True, without_gossip=True)
        super().__init__(on_task_request, worker_options=options, **kwargs)

    def ensure_connected(self, conn: kombu.Connection) -> kombu.Connection:
        conf = self.app.conf
        startup = self.first_connection_attempt
        if startup and conf.broker_connection_retry_on_startup is not None:
            retry = conf.broker_connection_retry_on_startup
        else:
            retry = conf.broker_connection_retry
        if not retry:
            return super().ensure_connected(conn)
        outage = Reconnecting(conn.as_uri())
        intervals: dict[str, Any] = {  # floats: kombu's stubs say int, kombu takes any number
            "interval_start": RECONNECT_FIRST,
            "interval_step": RECONNECT_STEP,
            "interval_max": RECONNECT_MOST,
        }
        conn = conn.ensure_connection(
            outage.failed, conf.broker_connection_max_retries, callback=maybe_shutdown, **intervals
        )
        outage.back()
        self.first_connection_attempt = False
        self.broker_connection_retry_attempt = 0
        return conn

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


class NeighbourlyConsumer(EmbedderConsumer):
    """The consumer with Celery's mingle and gossip, for WORKER_MINGLE_GOSSIP=true."""

    without_neighbours = False
