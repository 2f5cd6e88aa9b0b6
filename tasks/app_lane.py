"""The app's lane: a job from the app embeds its own skill and, in the same request, the skills
of the app's jobs waiting behind it, so that a burst (a reviewer approving a queue, a tenant
importing its catalog) drains in batches while every job keeps its own message.

A job peeks at the oldest messages of the interactive queues (the Redis lists Celery's broker
keeps), reserves the skills of up to EMBED_BATCH_SIZE - 1 of them for a short while, and embeds
them with its own. Each companion whose vector was written is marked "embedded"; when its own
job comes, it takes the mark and reports `embedded` without another look at the database (the
job ahead read the skill after this job was queued), with its own result and Flower entry.
Nothing waits for a batch to fill: a lone publish goes at once. Every skill of the request is
counted toward deaths (tasks.crashes), so a skill that kills the process is sent alone from
then on, and capped, as a lone job's is.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from tasks.crashes import APP_JOBS
from tasks.embedding import Embedded, EmbedRequest, Outcome, Result, embed_skills, skill_name
from tasks.errors import WorkerDied, database_error
from tasks.queues import CELERY_DEFAULT, EMBED_SKILL, INTERACTIVE
from tasks.retry import describe
from tasks.runtime import Runtime
from tasks.switch import stage_edits

logger = logging.getLogger(__name__)

# The lanes the app's jobs wait in, in the order the worker drains them (sorted names).
LANES = (CELERY_DEFAULT, INTERACTIVE)
# How many waiting messages a job looks at for each companion it wants: the oldest may be
# reserved by a job ahead of it (on this worker or another).
PEEK_FACTOR = 4
# How far back a job looks, in pages of PEEK_FACTOR x its companions (about 1,000 messages).
PEEK_PAGES = 8
RESERVED = "embedder:app:reserved:"
EMBEDDED = "embedder:app:embedded:"
# A mark outlives any queue a burst leaves: its job reports `embedded`, not `unchanged`.
MARK_SECONDS = 6 * 3600
# Between two looks for the mark of a job whose skill is in a request ahead.
WAIT_SECONDS = 0.003


@dataclass(frozen=True, slots=True)
class Waiting:
    """A skill that app jobs waiting in the queues ask for, and those jobs' ids."""

    request: EmbedRequest
    jobs: list[str]


def embed_app_job(rt: Runtime, request: EmbedRequest, job_id: str | None = None) -> Result:
    """Embed a job's skill with the app's jobs waiting behind it; the job's own result."""
    skill_id = request.skill_id
    written_ahead = _wait_for_mark(rt, skill_id, job_id) if job_id else None
    if written_ahead is not None:
        # A job ahead read this skill after this job was queued, so after the edit it stands
        # for, and wrote its vector: the job is done (a newer edit has a job of its own).
        return Embedded(Outcome.EMBEDDED, written_ahead)
    most = rt.settings.embed_max_deliveries
    deaths = rt.crashes.deaths(APP_JOBS, [skill_id]).get(skill_id, 0)
    if deaths >= most:
        return WorkerDied(deaths, skill_name(rt, skill_id, request.tenant_id))
    own = _reserve_own(rt, skill_id) if job_id else False
    if job_id and not own:
        # The lane's turn took the skill between the look and the reservation: its mark comes.
        written_ahead = _wait_for_mark(rt, skill_id, job_id)
        if written_ahead is not None:
            return Embedded(Outcome.EMBEDDED, written_ahead)
    # A process died while embedding it: alone, it cannot take neighbours down again.
    companions = [] if deaths or request.force else waiting_companions(rt, request)
    result = embed_together(rt, request, companions, release_own=own)
    if companions:
        # More of the burst is likely waiting: embed it while the jobs just served confirm.
        lane_ahead(rt).ensure()
    assert result is not None  # a request's own result
    return result


def embed_together(
    rt: Runtime,
    request: EmbedRequest | None,
    companions: Sequence[Waiting],
    *,
    release_own: bool = False,
) -> Result | None:
    """One request for `request`'s skill (if any) and the companions'; marks the companions'
    jobs whose skill was written, then frees their reservations (and `request`'s, if this job
    holds it). `request`'s result."""
    requests = [*([request] if request else []), *(c.request for c in companions)]
    try:
        with rt.crashes.embedding(APP_JOBS, [r.skill_id for r in requests], clear_on_success=True):
            results = embed_skills(rt, requests)
        stage_edits(rt, requests, results)  # while a tenant switches models: the new one's too
        theirs = results[1:] if request else results
        written = [
            (c, result.name)
            for c, result in zip(companions, theirs, strict=True)
            if isinstance(result, Embedded) and result.outcome is Outcome.EMBEDDED
        ]
        # Marks before the reservations go: a job waiting on its skill sees one or the other.
        _mark(rt.redis, {job: name for c, name in written for job in c.jobs})
    finally:
        ours = [c.request.skill_id for c in companions]
        _release(rt.redis, [*ours, *([request.skill_id] if request and release_own else [])])
    if companions:
        leader = request.skill_id if request else "the lane's own turn"
        logger.info("Embedded %d waiting app jobs' skills with %s", len(written), leader)
    return results[0] if request else None


def _wait_for_mark(rt: Runtime, skill_id: str, job_id: str) -> str | None:
    """The job's mark; while its skill is reserved (in a request ahead), wait for it, up to a
    slot's lease (a holder that died leaves the job to embed its skill itself)."""
    deadline = time.monotonic() + rt.slot_lease_seconds
    while True:
        name = _take_mark(rt.redis, job_id)
        if name is not None:
            return name
        try:
            reserved = bool(rt.redis.exists(RESERVED + skill_id))
        except redis.RedisError:
            return None
        if not reserved or time.monotonic() > deadline:
            return _take_mark(rt.redis, job_id)  # written just before the reservation went
        time.sleep(WAIT_SECONDS)


class LaneAhead:
    """This process's turn ahead of the app's jobs: after a job served a batch of a burst,
    a thread embeds the next ones waiting (reserved, marked) while the served jobs confirm,
    so the model's time overlaps theirs, as a backfill's batches overlap its jobs."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def ensure(self) -> None:
        with self._lock:
            if self._stopping.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._drain, name="app-lane", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        try:
            while not self._stopping.is_set():
                companions = waiting_companions(self.rt, None)
                if not companions:
                    return
                embed_together(self.rt, None, companions)
        except Exception as exc:
            # The jobs embed their own skills: nothing waits on this turn but a faster drain.
            logger.warning("The app lane's turn stopped: %s", describe(database_error(exc) or exc))

    def stop(self) -> None:
        self._stopping.set()


_ahead: LaneAhead | None = None
_ahead_lock = threading.Lock()


def lane_ahead(rt: Runtime) -> LaneAhead:
    global _ahead
    with _ahead_lock:
        if _ahead is None or _ahead.rt is not rt:
            _ahead = LaneAhead(rt)
        return _ahead


def reset() -> None:
    """Forget the parent's turn after a fork (its thread was not copied)."""
    global _ahead
    _ahead = None


def stop() -> None:
    if _ahead is not None:
        _ahead.stop()


def _reserve_own(rt: Runtime, skill_id: str) -> bool:
    """Reserve the job's own skill, so that no turn ahead sends it too; False if one has it."""
    try:
        return bool(
            rt.redis.set(RESERVED + skill_id, "own", nx=True, px=int(rt.claim_seconds * 1000))
        )
    except redis.RedisError:
        return True  # without Redis, the job embeds its skill itself


def _release(client: redis.Redis, skill_ids: Sequence[str]) -> None:
    if not skill_ids:
        return
    with contextlib.suppress(redis.RedisError):  # else they expire by themselves
        client.delete(*(RESERVED + skill_id for skill_id in skill_ids))


def _take_mark(client: redis.Redis, job_id: str) -> str | None:
    """The skill's name if a job ahead embedded it for this job (the mark is used up).

    Marks are per job, not per skill: a later job for the same skill (a later edit) never
    takes a mark meant for an earlier one."""
    try:
        name = client.getdel(EMBEDDED + job_id)
    except redis.RedisError:
        return None  # the job embeds its skill itself, or finds it current
    if name is None:
        return None
    return name.decode() if isinstance(name, bytes) else str(name)


def _mark(client: redis.Redis, written: dict[str, str]) -> None:
    """Mark the jobs whose skill was written, with its name, for them to report."""
    try:
        pipe = client.pipeline(transaction=False)
        for job, name in written.items():
            pipe.set(EMBEDDED + job, name, ex=MARK_SECONDS)
        pipe.execute()
    except redis.RedisError as exc:
        # The vectors are written: without the marks their jobs find them current, no more.
        logger.warning("Could not mark the app jobs embedded together: %s", exc)


def waiting_companions(rt: Runtime, request: EmbedRequest | None) -> list[Waiting]:
    """App jobs waiting in the interactive lanes, oldest first, reserved for this job.

    The oldest waiting jobs of a burst are mostly reserved already (their skills went with a
    job ahead, their own jobs have yet to confirm it), so the queues are read a page at a time,
    further back, until the batch is full or PEEK_PAGES pages were read.
    """
    wanted = rt.settings.embed_batch_size - (1 if request else 0)
    if wanted < 1:
        return []
    page = wanted * PEEK_FACTOR
    mine: list[Waiting] = []
    seen = {request.skill_id} if request else set()
    try:
        for number in range(PEEK_PAGES):
            candidates = peek(rt.redis, page, start=number * page, exclude=seen)
            seen.update(c.request.skill_id for c in candidates)
            deaths = rt.crashes.deaths(APP_JOBS, [c.request.skill_id for c in candidates])
            candidates = [c for c in candidates if not deaths.get(c.request.skill_id)]
            mine += reserve(rt.redis, candidates, wanted - len(mine), seconds=rt.claim_seconds)
            if len(mine) >= wanted or (not candidates and not _more(rt.redis, (number + 1) * page)):
                break
    except redis.RedisError as exc:
        # Companions are an optimisation: without Redis, the job embeds its own skill.
        logger.warning("Could not look at the waiting app jobs: %s", exc)
    return mine


def _more(client: redis.Redis, depth: int) -> bool:
    """Whether a lane holds messages further back than `depth`."""
    pipe = client.pipeline(transaction=False)
    for lane in LANES:
        pipe.llen(lane)
    return any(int(length) > depth for length in pipe.execute())


def peek(client: redis.Redis, limit: int, *, start: int = 0, exclude: set[str]) -> list[Waiting]:
    """Distinct skills of embed_skill messages waiting outside any run, from the `start`-th
    oldest message of each lane, `limit` messages a lane."""
    pipe = client.pipeline(transaction=False)
    for lane in LANES:
        # kombu pushes on the left and the worker pops on the right: the oldest are last.
        pipe.lrange(lane, -(start + limit), -(start + 1))
    found: dict[str, Waiting] = {}
    for messages in pipe.execute():
        for raw in reversed(messages):
            job = app_job(raw)
            if job is not None and job[1].skill_id not in exclude:
                found.setdefault(job[1].skill_id, Waiting(job[1], [])).jobs.append(job[0])
    return list(found.values())


def app_job(raw: bytes) -> tuple[str, EmbedRequest] | None:
    """The job id and skill of a waiting `tasks.embed_skill` message from the app (Celery's
    message protocol 2, as Celery and celery-node send it); None for anything else."""
    try:
        message = orjson.loads(raw)
        headers = message.get("headers") or {}
        job_id = headers.get("id")
        if headers.get("task") != EMBED_SKILL or headers.get("eta") or not job_id:
            return None
        body: Any = message["body"]
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = orjson.loads(body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return None
    values = dict(zip(("skill_id", "tenant_id", "run_id", "force"), args, strict=False))
    values.update(kwargs)
    skill_id, tenant_id = values.get("skill_id"), values.get("tenant_id")
    if values.get("run_id") is not None or values.get("force") or not isinstance(skill_id, str):
        return None
    return str(job_id), EmbedRequest(skill_id, tenant_id if isinstance(tenant_id, str) else None)


def reserve(
    client: redis.Redis, candidates: Sequence[Waiting], most: int, *, seconds: float
) -> list[Waiting]:
    """The first `most` candidates no other job has reserved, now reserved for `seconds`.

    A reservation only keeps other jobs from taking the skill as a companion: its own job
    always embeds it if it is not current, so a job that dies holding one loses nothing.
    """
    token = uuid.uuid4().hex
    pipe = client.pipeline(transaction=False)
    for candidate in candidates:
        pipe.set(RESERVED + candidate.request.skill_id, token, nx=True, px=int(seconds * 1000))
    taken = pipe.execute()
    mine = [c for c, ok in zip(candidates, taken, strict=True) if ok]
    extra = mine[most:]
    if extra:
        client.delete(*(RESERVED + c.request.skill_id for c in extra))
    return mine[:most]
