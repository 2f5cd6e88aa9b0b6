"""The consumer's answer to messages Celery cannot run: one line each, set aside, counted.

Celery already tells these apart (no task headers, a task nobody registers, a content type
the worker does not accept, a body that does not decode) and logs each with the whole body, a
traceback or both. RefusingConsumer keeps Celery's decision (the message is taken off the
queue, never retried) and replaces the report with tasks.refusals: one line naming the queue,
what is wrong and where the message was set aside. A pickled body is refused by kombu before
it is decoded (accept_content is JSON only), so it is never unpickled.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from tasks import refusals

logger = logging.getLogger(__name__)


class RefusingConsumer(Consumer):
    """Celery's consumer with one line, a record and a count for each message it refuses."""

    connection_errors: Any  # set by Celery, untyped in its stubs

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, refusals.NO_HEADERS, "it has no Celery task headers (task, id)")
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        known = ", ".join(sorted(t for t in self.app.tasks if not t.startswith("celery.")))
        self._refuse(
            message,
            refusals.UNKNOWN_TASK,
            f"no task {refusals.preview(str(name))} is registered here (these are: {known})",
        )
        message.reject_log_error(logger, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            reason = refusals.CONTENT_TYPE
            what = (
                f"its content type {message.content_type!r} is not accepted, and it was not"
                " decoded: send JSON (Celery's task_serializer='json')"
            )
        else:
            reason, what = refusals.NOT_A_MESSAGE, f"Celery cannot run it: {exc}"
        self._refuse(message, reason, what)
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        what = f"its body does not decode as {message.content_type!r}"
        self._refuse(message, refusals.UNDECODABLE, what)
        message.ack()

    def _refuse(self, message: Any, reason: str, what: str) -> None:
        # The transport's channel names the queue it popped this message from (a message's
        # routing key need not be its queue's name).
        channel = message.channel
        queue = str(getattr(channel, "popped_from", None) or "?")
        entry = json.dumps(getattr(message, "_raw", None) or message.body, default=repr)
        with channel.conn_or_acquire() as client:
            kept = refusals.set_aside(client, queue=queue, reason=reason, entry=entry)
        where = f"set aside in Redis list {refusals.SET_ASIDE}" if kept else "dropped"
        task_id = (message.headers or {}).get("id") if isinstance(message.headers, dict) else None
        named = f" {refusals.preview(str(task_id))}" if task_id else ""
        logger.warning("Refused a message%s of queue %s: %s (%s); %s", named, queue, what,
                       reason, where)  # fmt: skip
