"""The app's lane: a job from the app embeds its own skill and, in the same request, the skills
of the app's jobs waiting behind it, so that a burst (a reviewer approving a queue, a tenant
importing its catalog) drains in batches while every job keeps its own message.

A job's first look (one Redis script) takes its mark if a job ahead embedded its skill, and
says whether other app jobs wait. If some do, it peeks at the oldest messages of the interactive
queues (the Redis lists Celery's broker keeps), reserves the skills of up to
EMBED_BATCH_SIZE - 1 of them for a short while, and embeds them with its own. Each companion
whose vector was written is marked "embedded"; when its own job comes, it takes the mark and
reports `embedded` without another look at the database (the job ahead read the skill after
this job was queued), with its own result and Flower entry. Nothing waits for a batch to fill:
a lone publish goes at once. Every skill sent is counted while Ollama has it
(tasks.runtime.CrashCounts), so a skill that kills the process is sent alone from then on, and
capped, as a lone job's is.
A job's own skill is counted from its first look, where it takes its reservation, until the
reservation goes after the write: a lone publish counts and uncounts without round trips of
its own.
After a job served companions, a thread of its process (tasks.loops.LaneAhead) embeds the
next ones waiting, writing each batch while the next is with the provider.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from db.sql import unscoped
from tasks import CELERY_DEFAULT, EMBED_SKILL, INTERACTIVE
from tasks.arguments import fits
from tasks.embedding import (
    Batch,
    Embedded,
    EmbedRequest,
    Outcome,
    Result,
    fetch_vectors,
    load_and_decide,
    skill_name,
    write_vectors,
)
from tasks.retry import WorkerDied
from tasks.runtime import APP_JOBS, COUNT_SECONDS, Runtime

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


def embed_app_job(
    rt: Runtime, request: EmbedRequest, job_id: str | None = None
) -> tuple[Result, bool]:
    """Embed a job's skill with the app's jobs waiting behind it; the job's own result, and
    whether it served companions (more of a burst is likely waiting: tasks.loops.LaneAhead)."""
    skill_id = request.skill_id
    most = rt.settings.embed_max_deliveries
    if job_id is None:  # a call outside Celery: nothing to take, nothing to reserve
        own, deaths = False, rt.crashes.deaths(APP_JOBS, [skill_id]).get(skill_id, 0)
        waiting = True
    else:
        turn = _start(rt, skill_id, job_id)
        if isinstance(turn, str):
            # A job ahead read this skill after this job was queued, so after the edit it
            # stands for, and wrote its vector: the job is done (a newer edit has its own job).
            return Embedded(Outcome.EMBEDDED, turn), False
        own, deaths, waiting = turn
    if deaths >= most:
        return WorkerDied(deaths, skill_name(rt, skill_id, request.tenant_id)), False
    # A process died while embedding it: alone, it cannot take neighbours down again.
    alone = deaths or request.force or not waiting
    try:
        companions = [] if alone else waiting_companions(rt, request)
    except BaseException:
        Together(request, [], own).release(rt, done=False)  # its reservation, its count
        raise
    result = embed_together(rt, request, companions, own=own)
    assert result is not None  # a request's own result
    return result, bool(companions)


def embed_together(
    rt: Runtime,
    request: EmbedRequest | None,
    companions: Sequence[Waiting],
    *,
    own: bool = False,
) -> Result | None:
    """One request for `request`'s skill (if any) and the companions'; marks the companions'
    jobs whose skill was written, then frees their reservations (and `request`'s, with its
    count, if this job's first look took them: `own`). `request`'s result."""
    together = Together(request, list(companions), own)
    return write_together(rt, together, fetch_together(rt, together))


@dataclass(frozen=True, slots=True)
class Together:
    """The skills of one request to Ollama: a job's own (if any) and its companions'."""

    request: EmbedRequest | None
    companions: list[Waiting]
    # The job's first look reserved `request`'s skill and counted it (tasks.runtime.CrashCounts).
    own: bool = False

    @property
    def requests(self) -> list[EmbedRequest]:
        return [*([self.request] if self.request else []), *(c.request for c in self.companions)]

    @property
    def counted(self) -> list[str]:
        """The skill the job's first look counted already: its own, if it took it."""
        return [self.request.skill_id] if self.request is not None and self.own else []

    def uncounted(self, skill_ids: Sequence[str]) -> list[str]:
        """Those of `skill_ids` that the first look did not count already."""
        counted = self.counted
        return [skill_id for skill_id in skill_ids if skill_id not in counted]

    def release(self, rt: Runtime, *, done: bool) -> None:
        """Free the reservations held for this request (they expire by themselves otherwise),
        and end the count of the job's own skill: `done`, its deaths are forgotten, as a
        batch's that ended well; else the count goes back to its deaths."""
        counted = self.counted
        ours = [c.request.skill_id for c in self.companions] + counted
        if not ours:
            return
        with contextlib.suppress(redis.RedisError):  # else they expire, and the count stays
            pipe = rt.redis.pipeline(transaction=False)
            pipe.delete(*(RESERVED + skill_id for skill_id in ours))
            rt.crashes.end(APP_JOBS, counted, done=done, pipe=pipe)
            pipe.execute()


def fetch_together(rt: Runtime, together: Together) -> Batch:
    """Load and decide, then ask Ollama for the vectors; the skills sent are counted while
    Ollama has them (tasks.runtime.CrashCounts), so a process that dies there names them. If
    this fails, the reservations are freed: nothing will be written."""
    try:
        with unscoped(rt.engine) as conn:
            batch = load_and_decide(rt, conn, together.requests)
        sent = together.uncounted([item.request.skill_id for item in batch.pending])
        with rt.crashes.embedding(APP_JOBS, sent, clear_on_success=True):
            fetch_vectors(rt, batch, urgent=True)
    except BaseException:
        together.release(rt, done=False)
        raise
    return batch


def write_together(rt: Runtime, together: Together, batch: Batch) -> Result | None:
    """Write the fetched vectors, mark the companions' jobs whose skill was written, free the
    reservations; the job's own result (None for the lane's own turn)."""
    request, companions = together.request, together.companions
    done = False
    try:
        with unscoped(rt.engine) as conn:
            results = write_vectors(rt, conn, batch)
        for hook in rt.hooks.after_live_write:  # a switch under way stages the edit, say
            hook(rt, together.requests, results)
        theirs = results[1:] if request else results
        written = [
            (c, result.name)
            for c, result in zip(companions, theirs, strict=True)
            if isinstance(result, Embedded) and result.outcome is Outcome.EMBEDDED
        ]
        # Marks before the reservations go: a job waiting on its skill sees one or the other.
        _mark(rt.redis, {job: name for c, name in written for job in c.jobs})
        done = True
    finally:
        together.release(rt, done=done)
    if companions:
        leader = request.skill_id if request else "the lane's own turn"
        logger.info("Embedded %d waiting app jobs' skills with %s", len(written), leader)
    return results[0] if request else None


# A job's first look, in one round trip: its mark (a job ahead embedded its skill), else its
# skill's deaths, else a reservation of its skill (only for a skill it will send), which
# counts the skill from here (tasks.runtime.CrashCounts: Together.release ends it); and whether
# any app job waits in the lanes (KEYS[4..]): a lone publish need not peek at them.
_START = f"""
local name = redis.call('GETDEL', KEYS[1])
if name then return {{'marked', name, 0}} end
local waiting = 0
for i = 4, #KEYS do waiting = waiting + redis.call('LLEN', KEYS[i]) end
local deaths = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if deaths >= tonumber(ARGV[2]) then return {{'dead', deaths, waiting}} end
if redis.call('SET', KEYS[2], 'own', 'NX', 'PX', ARGV[3]) then
  redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
  redis.call('EXPIRE', KEYS[3], {COUNT_SECONDS})
  return {{'own', deaths, waiting}}
end
return {{'reserved', deaths, waiting}}
"""


def _start(rt: Runtime, skill_id: str, job_id: str) -> str | tuple[bool, int, bool]:
    """The skill's name if a job ahead embedded it for this job; else whether this job holds
    its skill's reservation, the skill's deaths, and whether other app jobs wait. While the
    skill is reserved by a request ahead, wait for its mark, up to a slot's lease (a holder
    that died leaves the job to embed its skill itself)."""
    script = rt.redis.register_script(_START)
    keys = [EMBEDDED + job_id, RESERVED + skill_id, rt.crashes.key(APP_JOBS), *LANES]
    args: list[str | int] = [
        skill_id,
        rt.settings.embed_max_deliveries,
        int(rt.claim_seconds * 1000),
    ]
    deadline = time.monotonic() + rt.slot_lease_seconds
    while True:
        kind, value, waiting = script(keys=keys, args=args)
        if kind == b"marked":
            return bytes(value).decode()
        if kind != b"reserved":
            return kind == b"own", int(value), bool(waiting)
        if time.monotonic() > deadline:
            return False, int(value), bool(waiting)
        time.sleep(WAIT_SECONDS)


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
            candidates, deepest = peek(rt.redis, page, start=number * page, exclude=seen)
            seen.update(c.request.skill_id for c in candidates)
            mine += reserve(rt, candidates, wanted - len(mine))
            if len(mine) >= wanted or deepest <= (number + 1) * page:
                break
    except redis.RedisError as exc:
        # Companions are an optimisation: without Redis, the job embeds its own skill.
        logger.warning("Could not look at the waiting app jobs: %s", exc)
    return mine


def peek(
    client: redis.Redis, limit: int, *, start: int = 0, exclude: set[str]
) -> tuple[list[Waiting], int]:
    """Distinct skills of embed_skill messages waiting outside any run, from the `start`-th
    oldest message of each lane, `limit` messages a lane; and the longest lane's length."""
    pipe = client.pipeline(transaction=False)
    for lane in LANES:
        # kombu pushes on the left and the worker pops on the right: the oldest are last.
        pipe.lrange(lane, -(start + limit), -(start + 1))
    for lane in LANES:
        pipe.llen(lane)
    answers = pipe.execute()
    found: dict[str, Waiting] = {}
    for messages in answers[: len(LANES)]:
        for raw in reversed(messages):
            job = app_job(raw)
            if job is not None and job[1].skill_id not in exclude:
                found.setdefault(job[1].skill_id, Waiting(job[1], [])).jobs.append(job[0])
    return list(found.values()), max(int(n) for n in answers[len(LANES) :])


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
    if not fits(EMBED_SKILL, args, kwargs):  # its own job refuses it: not a companion either
        return None
    values = dict(zip(("skill_id", "tenant_id", "run_id", "force"), args, strict=False))
    values.update(kwargs)
    skill_id, tenant_id = values.get("skill_id"), values.get("tenant_id")
    if values.get("run_id") is not None or values.get("force") or not isinstance(skill_id, str):
        return None
    return str(job_id), EmbedRequest(skill_id, tenant_id if isinstance(tenant_id, str) else None)


# Reserve the first ARGV[3] skills (KEYS[2..], ids in ARGV[4..]) that no request holds and
# that never took a process down (KEYS[1], the deaths): those go alone, with their own job.
_RESERVE = """
local taken, left = {}, tonumber(ARGV[3])
for i = 2, #KEYS do
  local ok = 0
  if left > 0 and tonumber(redis.call('HGET', KEYS[1], ARGV[i + 2]) or '0') == 0
     and redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    ok, left = 1, left - 1
  end
  taken[#taken + 1] = ok
end
return taken
"""


def reserve(rt: Runtime, candidates: Sequence[Waiting], most: int) -> list[Waiting]:
    """The first `most` candidates no other request holds and no process died on, now
    reserved for a batch's longest hold.

    A reservation only keeps other jobs from taking the skill as a companion: its own job
    always embeds it if it is not current, so a job that dies holding one loses nothing.
    """
    if not candidates or most < 1:
        return []
    ids = [c.request.skill_id for c in candidates]
    script = rt.redis.register_script(_RESERVE)
    taken = script(
        keys=[rt.crashes.key(APP_JOBS), *(RESERVED + skill_id for skill_id in ids)],
        args=[uuid.uuid4().hex, int(rt.claim_seconds * 1000), most, *ids],
    )
    return [c for c, ok in zip(candidates, taken, strict=True) if ok]
