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
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from tasks import refusals

logger = logging.getLogger(__name__)

_TEXT = (str, type(None))
_NUMBER = (int, float, type(None))
# The task headers Celery reads in the worker's event loop (protocol 2), and the types it can
# read there: any other value raises in the loop, and the worker stops.
HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,),
    "id": (str,),
    "shadow": _TEXT,
    "eta": _TEXT,
    "expires": (str, int, float, type(None)),
    "retries": (int, type(None)),
    "timelimit": (list, tuple, type(None)),
    "root_id": _TEXT,
    "parent_id": _TEXT,
    "group": _TEXT,
    "origin": _TEXT,
    "argsrepr": _TEXT,
    "kwargsrepr": _TEXT,
    "ignore_result": (bool, type(None)),
}


def task_problem(message: Any) -> tuple[str, str] | None:
    """Why Celery could not read this task message (reason, what is wrong), or None: its headers
    must have the types Celery reads, and its body be [args, kwargs, options]."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # not protocol 2: Celery refuses it itself (on_unknown_message)
    problem = header_problem(headers)
    if problem is not None:
        return refusals.BAD_HEADERS, problem
    try:
        body = message.decode()  # kombu keeps it: Celery's own reading does not decode again
    except Exception:  # a refused content type or undecodable body: Celery refuses it itself
        return None
    if not (
        isinstance(body, list | tuple)
        and len(body) == 3
        and isinstance(body[0], list | tuple)
        and isinstance(body[1], dict)
        and isinstance(body[2], dict | None)
    ):
        shape = refusals.shown(body)
        return refusals.NOT_A_MESSAGE, f"its body is not [args, kwargs, options]: {shape}"
    return None


def header_problem(headers: dict[str, Any]) -> str | None:
    """What is wrong with a task message's headers for Celery to read them, or None."""
    for name, types in HEADER_TYPES.items():
        value = headers.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"its {name} header is {type(value).__name__} {refusals.shown(value)}"
    limits = headers.get("timelimit")
    if limits is not None and (
        len(limits) != 2 or not all(isinstance(v, _NUMBER) and v is not True for v in limits)
    ):
        return f"its timelimit header is not [soft, hard] seconds: {refusals.shown(limits)}"
    return None


class RefusingConsumer(Consumer):
    """Celery's consumer with one line, a record and a count for each message it refuses."""

    connection_errors: Any  # set by Celery, untyped in its stubs
    channel_errors: Any

    def create_task_handler(self, promise: Any = None) -> Callable[..., Any]:
        handler = super().create_task_handler(*([promise] if promise is not None else []))
        passing = (*self.connection_errors, *self.channel_errors)

        def on_task_received(message: Any) -> Any:
            # Celery reads headers and body in the event loop; a value of the wrong type (a
            # list for a task name, an id, a time limit) raises there and stops the worker.
            problem = task_problem(message)
            if problem is not None:
                self._refuse(message, *problem)
                message.reject_log_error(logger, self.connection_errors)
                return None
            try:
                return handler(message)
            except passing:
                raise
            except Exception as exc:  # what the checks above did not foresee: still one line
                what = f"Celery cannot read it ({type(exc).__name__}: {_one_line(exc)})"
                self._refuse(message, refusals.NOT_A_MESSAGE, what)
                if not message.acknowledged:
                    message.reject_log_error(logger, self.connection_errors)
                return None

        return on_task_received

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
            f"no task {refusals.shown(name)} is registered here (these are: {known})",
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
            reason, what = refusals.NOT_A_MESSAGE, f"Celery cannot run it: {_one_line(exc)}"
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
        named = f" {refusals.shown(task_id)}" if task_id else ""
        logger.warning("Refused a message%s of queue %s: %s (%s); %s", named, queue, what,
                       reason, where)  # fmt: skip


def _one_line(exc: Exception, limit: int = 200) -> str:
    # An error's text may quote what the producer sent: one line, cut, like any value shown.
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else f"{text[:limit]}..."
