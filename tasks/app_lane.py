"""The app's lane: a job from the app embeds its own skill and, in the same request, the skills
of the app's jobs waiting behind it, so that a burst (a reviewer approving a queue, a tenant
importing its catalog) drains in batches while every job keeps its own message.

A job peeks at the oldest messages of the interactive queues (the Redis lists Celery's broker
keeps), reserves the skills of up to EMBED_BATCH_SIZE - 1 of them for a short while, and embeds
them with its own. Each companion whose vector was written is marked "embedded"; when its own
job comes, it finds its skill current and reports `embedded` from that mark, with its own
retries, result and Flower entry as before. Nothing waits for a batch to fill: a lone publish
goes at once. Every skill of the request is counted toward deaths (tasks.crashes), so a skill
that kills the process is sent alone from then on, and capped, as a lone job's is.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import redis

from tasks.crashes import APP_JOBS
from tasks.embedding import Embedded, EmbedRequest, Outcome, Result, embed_skills, skill_name
from tasks.errors import WorkerDied
from tasks.queues import CELERY_DEFAULT, EMBED_SKILL, INTERACTIVE
from tasks.runtime import Runtime
from tasks.switch import stage_edits

logger = logging.getLogger(__name__)

# The lanes the app's jobs wait in, in the order the worker drains them (sorted names).
LANES = (CELERY_DEFAULT, INTERACTIVE)
# How many waiting messages a job looks at for each companion it wants: the oldest may be
# reserved by a job ahead of it (on this worker or another).
PEEK_FACTOR = 4
RESERVED = "embedder:app:reserved:"
EMBEDDED = "embedder:app:embedded:"
# A mark outlives any queue a burst leaves: its job reports `embedded`, not `unchanged`.
MARK_SECONDS = 6 * 3600


def embed_app_job(rt: Runtime, request: EmbedRequest) -> Result:
    """Embed a job's skill with the app's jobs waiting behind it; the job's own result."""
    skill_id = request.skill_id
    most = rt.settings.embed_max_deliveries
    deaths = rt.crashes.deaths(APP_JOBS, [skill_id]).get(skill_id, 0)
    if deaths >= most:
        return WorkerDied(deaths, skill_name(rt, skill_id, request.tenant_id))
    # A process died while embedding it: alone, it cannot take neighbours down again.
    companions = [] if deaths or request.force else waiting_companions(rt, request)
    requests = [request, *companions]
    with rt.crashes.embedding(APP_JOBS, [r.skill_id for r in requests], clear_on_success=True):
        results = embed_skills(rt, requests)
    stage_edits(rt, requests, results)  # while a tenant switches models: the new one's too
    written = [
        c.skill_id
        for c, result in zip(companions, results[1:], strict=True)
        if isinstance(result, Embedded) and result.outcome is Outcome.EMBEDDED
    ]
    own = results[0]
    marked = _mark(rt.redis, written, skill_id)
    if companions:
        logger.info("Embedded %d waiting app jobs' skills with %s's", len(written), skill_id)
    if marked and isinstance(own, Embedded) and own.outcome is Outcome.UNCHANGED:
        return Embedded(Outcome.EMBEDDED, own.name)  # written for this job by one ahead of it
    return own


def _mark(client: redis.Redis, written: Sequence[str], own: str) -> bool:
    """Mark the companions written; whether a job ahead of this one marked `own` (taken)."""
    try:
        pipe = client.pipeline(transaction=False)
        for companion in written:
            pipe.set(EMBEDDED + companion, 1, ex=MARK_SECONDS)
        pipe.getdel(EMBEDDED + own)
        return pipe.execute()[-1] is not None
    except redis.RedisError as exc:
        # The vectors are written: without the marks their jobs report `unchanged`, no more.
        logger.warning("Could not mark the app jobs embedded together: %s", exc)
        return False


def waiting_companions(rt: Runtime, request: EmbedRequest) -> list[EmbedRequest]:
    """App jobs waiting in the interactive lanes, oldest first, reserved for this job."""
    wanted = rt.settings.embed_batch_size - 1
    if wanted < 1:
        return []
    try:
        candidates = peek(rt.redis, wanted * PEEK_FACTOR, exclude={request.skill_id})
        if not candidates:
            return []
        deaths = rt.crashes.deaths(APP_JOBS, [c.skill_id for c in candidates])
        candidates = [c for c in candidates if not deaths.get(c.skill_id)]
        return reserve(rt.redis, candidates, wanted, seconds=rt.claim_seconds)
    except redis.RedisError as exc:
        # Companions are an optimisation: without Redis, the job embeds its own skill.
        logger.warning("Could not look at the waiting app jobs: %s", exc)
        return []


def peek(client: redis.Redis, limit: int, *, exclude: set[str]) -> list[EmbedRequest]:
    """Up to `limit` distinct skills of embed_skill messages waiting outside any run."""
    pipe = client.pipeline(transaction=False)
    for lane in LANES:
        pipe.lrange(lane, -limit, -1)  # kombu pushes on the left, the worker pops the right
    found: dict[str, EmbedRequest] = {}
    for messages in pipe.execute():
        for raw in reversed(messages):
            request = app_job(raw)
            if request is not None and request.skill_id not in exclude:
                found.setdefault(request.skill_id, request)
            if len(found) >= limit:
                return list(found.values())
    return list(found.values())


def app_job(raw: bytes) -> EmbedRequest | None:
    """The skill of a waiting `tasks.embed_skill` message from the app (Celery's message
    protocol 2, as Celery and celery-node send it); None for anything else."""
    try:
        message = json.loads(raw)
        headers = message.get("headers") or {}
        if headers.get("task") != EMBED_SKILL or headers.get("eta"):
            return None
        body: Any = message["body"]
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return None
    values = dict(zip(("skill_id", "tenant_id", "run_id", "force"), args, strict=False))
    values.update(kwargs)
    skill_id, tenant_id = values.get("skill_id"), values.get("tenant_id")
    if values.get("run_id") is not None or values.get("force") or not isinstance(skill_id, str):
        return None
    return EmbedRequest(skill_id, tenant_id if isinstance(tenant_id, str) else None)


def reserve(
    client: redis.Redis, candidates: Sequence[EmbedRequest], most: int, *, seconds: float
) -> list[EmbedRequest]:
    """The first `most` candidates no other job has reserved, now reserved for `seconds`.

    A reservation only keeps other jobs from taking the skill as a companion: its own job
    always embeds it if it is not current, so a job that dies holding one loses nothing.
    """
    token = uuid.uuid4().hex
    pipe = client.pipeline(transaction=False)
    for candidate in candidates:
        pipe.set(RESERVED + candidate.skill_id, token, nx=True, px=int(seconds * 1000))
    taken = pipe.execute()
    mine = [c for c, ok in zip(candidates, taken, strict=True) if ok]
    extra = mine[most:]
    if extra:
        client.delete(*(RESERVED + c.skill_id for c in extra))
    return mine[:most]
