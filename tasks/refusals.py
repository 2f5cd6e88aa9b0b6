"""Messages the worker refused: set aside in Redis for a person, and counted per reason.

Anything may land on a queue (a buggy or hostile producer, a hand-typed LPUSH, a truncated
write): the worker never runs it and never dies of it. Each refusal leaves one record on a
bounded Redis list (the entry's first bytes, why, where from) and adds one to its reason's
count in a hash, so `python -m worker status` sees every worker's refusals without asking them;
the Prometheus counter gives the same per process. Kept light (redis and the standard library):
the broker transport imports it in every process that talks to the broker.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Final

import redis

logger = logging.getLogger(__name__)

SET_ASIDE: Final = "embedder:refused"  # the list of records, newest first
COUNTS: Final = "embedder:refused:counts"  # reason -> count, since Redis was last emptied
KEEP: Final = 1000  # records on the list; older ones go
ENTRY_BYTES: Final = 65536  # of each entry kept: enough to see what sent it
PREVIEW_CHARS: Final = 80  # of an entry or a value quoted in a log line

# The reasons, as counted and shown.
NOT_JSON: Final = "not_json"  # the entry is not JSON at all
NOT_A_MESSAGE: Final = "not_a_message"  # JSON, but not a message envelope (properties, body)
NO_HEADERS: Final = "no_headers"  # a message without the task headers Celery needs
BAD_HEADERS: Final = "bad_headers"  # task headers of the wrong type (a list for an id, ...)
UNKNOWN_TASK: Final = "unknown_task"  # a task name no worker registers
CONTENT_TYPE: Final = "content_type"  # a serializer the worker does not accept (pickle, yaml)
UNDECODABLE: Final = "undecodable"  # a body that does not decode as its content type says
BAD_ARGUMENTS: Final = "bad_arguments"  # a task with arguments its signature does not take


def preview(entry: bytes | str, limit: int = PREVIEW_CHARS) -> str:
    """The first `limit` characters of `entry`, quoted, with how much was cut."""
    text = entry.decode("utf-8", "backslashreplace") if isinstance(entry, bytes) else entry
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def shown(value: object, limit: int = PREVIEW_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters with how long it was."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def set_aside(client: redis.Redis, *, queue: str, reason: str, entry: bytes | str) -> bool:
    """Keep `entry` on the SET_ASIDE list and count `reason`; False if Redis did not take it."""
    text = entry.decode("utf-8", "backslashreplace") if isinstance(entry, bytes) else entry
    record = json.dumps(
        {"at": time.time(), "queue": queue, "reason": reason, "entry": text[:ENTRY_BYTES]}
    )
    _count(reason)
    try:
        with client.pipeline() as pipe:
            pipe.lpush(SET_ASIDE, record)
            pipe.ltrim(SET_ASIDE, 0, KEEP - 1)
            pipe.hincrby(COUNTS, reason, 1)
            pipe.execute()
    except redis.RedisError as exc:
        logger.warning("Could not set aside a refused entry of %s: Redis did not answer (%s)",
                       queue, exc)  # fmt: skip
        return False
    return True


def counts(client: redis.Redis) -> dict[str, int]:
    """Refused messages per reason, across the deployment (every worker counts into Redis)."""
    raw: dict[bytes, bytes] = client.hgetall(COUNTS)  # type: ignore[assignment]  # sync client
    return {key.decode(): int(value) for key, value in sorted(raw.items())}


def _count(reason: str) -> None:
    # prometheus_client only where a refusal happens: the transport loads this module in
    # processes (`celery call`, Flower) that must not pay for it.
    from tasks.metrics import count_refusal

    count_refusal(reason)
