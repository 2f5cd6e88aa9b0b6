"""The broker transport: kombu's Redis transport, screening each entry it pops off a queue.

Kombu decodes a popped entry in the worker's event loop, and anything that is not a message
envelope (not JSON, JSON without `properties`, a body that is not base64) raises there: Celery
takes it for an unrecoverable error and the worker exits (celery/celery#1113, #1674). Here the
BRPOP reply is screened first, through redis-py's response callback on the channel's own
client: an entry kombu could not read is set aside (tasks.refusals), gets one line, and the
loop goes on as if BRPOP had timed out. Messages Celery itself refuses (no task headers, an
unknown task, pickle) are handled by the consumer (worker.refusing).

Loaded by every process that talks to the broker (`celery call`, Flower): nothing heavy here
(tasks.refusals is kept light for it).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str

from tasks import refusals

logger = logging.getLogger(__name__)


def envelope_problem(entry: bytes) -> tuple[str, str] | None:
    """Why kombu could not read `entry` as a message: (reason, what is wrong), or None."""
    try:
        payload = json.loads(entry)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return refusals.NOT_JSON, "it is not JSON"
    if not isinstance(payload, dict):
        return refusals.NOT_A_MESSAGE, f"it is JSON {type(payload).__name__}, not a message object"
    properties = payload.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return refusals.NOT_A_MESSAGE, "it has no properties with a delivery_tag"
    delivery = properties.get("delivery_info")
    if not isinstance(delivery, dict) or not {"exchange", "routing_key"} <= delivery.keys():
        return refusals.NOT_A_MESSAGE, "its properties lack delivery_info (exchange, routing_key)"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return refusals.NOT_A_MESSAGE, "its body is not a string"
    for name, value, expected in (
        ("headers", payload.get("headers"), dict),
        ("content-type", payload.get("content-type"), str),
        ("content-encoding", payload.get("content-encoding"), str),
        ("body_encoding", properties.get("body_encoding"), str),
        ("priority", properties.get("priority"), int),
    ):
        if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            return refusals.NOT_A_MESSAGE, f"its {name} is {type(value).__name__}"
    if body and properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return refusals.UNDECODABLE, "its body is not base64 as its body_encoding says"
    return None


class ScreenedChannel(kombu_redis.Channel):
    """A Redis channel whose BRPOP replies are screened before kombu decodes them."""

    # The queue of the entry being delivered: the consumer's refusals name it (worker.refusing).
    popped_from: str | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        client = super()._create_client(asynchronous=asynchronous)  # type: ignore[misc]
        if asynchronous:  # the client that sends BRPOP (the channel's `client`)
            client.set_response_callback("BRPOP", self._screen_popped)
        return client

    def _screen_popped(self, response: Any, **_: Any) -> tuple[bytes, bytes] | None:
        # redis-py's own BRPOP callback, plus the screen: None reads as "nothing popped".
        if not response:
            return None
        key, entry = response
        queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
        problem = envelope_problem(entry)
        if problem is None:
            self.popped_from = queue
            return key, entry
        self._refuse(queue, entry, *problem)
        return None

    def _refuse(self, queue: str, entry: bytes, reason: str, what: str) -> None:
        with self.conn_or_acquire() as client:
            kept = refusals.set_aside(client, queue=queue, reason=reason, entry=entry)
        where = f"set aside in Redis list {refusals.SET_ASIDE}" if kept else "dropped"
        logger.warning("Refused an entry of queue %s: %s (%s); %s: %s", queue, what, reason,
                       where, refusals.preview(entry))  # fmt: skip


class ScreenedTransport(kombu_redis.Transport):
    """kombu's Redis transport with ScreenedChannel (`broker_transport` of the Celery app)."""

    Channel = ScreenedChannel
