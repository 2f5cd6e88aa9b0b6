"""One skill's embedding, step by step: load and decide, fetch the vectors, write them.

The middle of every item's life, whoever started it (an app job: tasks.app_lane; a run's batch:
tasks.loops): `load_and_decide` reads the skills, the tenant's settings and the stored rows in
one statement and decides what each needs (`decide`, a pure function); `fetch_vectors` asks the
tenant's provider for the vectors, one call per (server, model, size); a write target writes
them. `LiveTarget` writes `skill_embeddings` under the write guard (the skills' locks and the
tenant's settings row held FOR SHARE, the model checked); a run of another kind (a model
switch's staging) brings its own target through the runtime's hooks.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sqlalchemy import Connection

from db import catalog
from db.catalog import PUBLISHED, SettingsRecord, input_hash, skill_text
from db.sql import scope_to_tenant, tenant_scope, unscoped
from tasks.provider import Answer, check_dimensions, column_target, embed_isolating
from tasks.retry import (
    EmbedderError,
    ModelSwitched,
    OllamaRejected,
    PermanentError,
    SkillNotFound,
    TenantMismatch,
    TransientError,
)
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)

# The app's column default: a row still holding it was never pointed anywhere on purpose, so the
# deployment's OLLAMA_URL applies (inside containers, localhost is not where Ollama runs).
APP_DEFAULT_OLLAMA_URL = "http://localhost:11434"


class Outcome(StrEnum):
    EMBEDDED = "embedded"  # a new or refreshed vector was written
    UNCHANGED = "unchanged"  # the stored vector already matches text, model and size
    REMOVED = "removed"  # the skill is not published (or gone): its row is deleted
    DISABLED = "disabled"  # the tenant has semantic similarity turned off
    SUPERSEDED = "superseded"  # the skill changed while we embedded; a newer job writes it
    DELETED = "deleted"  # a run's skill that was deleted before its turn: no failure


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    skill_id: str
    tenant_id: str | None = None
    force: bool = False
    # Read from the catalog (a run's item), not typed by someone: if the skill is gone now, it
    # was deleted, which is no failure; for a job from the app, an unknown id is one.
    listed: bool = False


@dataclass(frozen=True, slots=True)
class TenantConfig:
    enabled: bool
    ollama_url: str
    model: str
    dimensions: int


@dataclass(frozen=True, slots=True)
class StoredEmbedding:
    input_hash: str
    model_name: str
    dimensions: int


@dataclass(frozen=True, slots=True)
class Decision:
    action: Outcome | None  # None: embed `text`
    text: str = ""
    name: str = ""

    @property
    def needs_embedding(self) -> bool:
        return self.action is None


def decide(
    skill: catalog.SkillRecord,
    stored: StoredEmbedding | None,
    config: TenantConfig,
    *,
    force: bool = False,
) -> Decision:
    """What one skill needs, from what the database holds; no I/O."""
    if skill.status != PUBLISHED:
        return Decision(Outcome.REMOVED, name=skill.name)
    if not config.enabled:
        return Decision(Outcome.DISABLED, name=skill.name)
    text = skill_text(skill.name, skill.description)
    if (
        not force
        and stored is not None
        and stored.input_hash == input_hash(text)
        and stored.model_name == config.model
        and stored.dimensions == config.dimensions
    ):
        return Decision(Outcome.UNCHANGED, name=skill.name)
    return Decision(None, text=text, name=skill.name)


def tenant_config(runtime: Runtime, conn: Connection, tenant_id: str) -> TenantConfig:
    """The tenant's site_settings over the environment's defaults; off when there is no row."""
    return config_from(runtime, catalog.get_site_settings(conn, tenant_id))


def config_from(runtime: Runtime, row: SettingsRecord | None) -> TenantConfig:
    """The configuration a site_settings row (None: none) gives over the environment's."""
    defaults = runtime.settings
    if row is None:
        return TenantConfig(False, defaults.ollama_url, defaults.ollama_model, 0)
    url = row.ollama_url if row.ollama_url and row.ollama_url != APP_DEFAULT_OLLAMA_URL else None
    return TenantConfig(
        enabled=row.semantic_similarity_enabled,
        ollama_url=(url or defaults.ollama_url).rstrip("/"),
        model=row.ollama_model or defaults.ollama_model,
        dimensions=row.embedding_dimensions or defaults.embedding_dimensions,
    )


def find_tenant(runtime: Runtime, skill_id: str) -> str:
    """The tenant a skill belongs to, looking in the default tenant first (RLS hides the rest)."""
    with unscoped(runtime.engine) as conn:
        tenant = catalog.find_tenant(conn, skill_id, runtime.settings.default_tenant_id)
    if tenant is None:
        raise SkillNotFound(f"no skill {skill_id!r} in any active tenant: check the id")
    return tenant


def skill_name(runtime: Runtime, skill_id: str, tenant_id: str | None) -> str:
    """The skill's name for a message, or its id when it cannot be read."""
    try:
        tenant = tenant_id or find_tenant(runtime, skill_id)
        with tenant_scope(runtime.engine, tenant) as conn:
            skill = catalog.get_skill(conn, skill_id)
    except EmbedderError:
        return skill_id
    return skill.name if skill is not None else skill_id


@dataclass
class Pending:
    index: int
    request: EmbedRequest
    tenant_id: str
    name: str
    text: str
    config: TenantConfig


@dataclass(frozen=True, slots=True)
class Embedded:
    """What happened to one skill, with its name for the log."""

    outcome: Outcome
    name: str


Result = Embedded | EmbedderError


def embed_skills(runtime: Runtime, requests: Sequence[EmbedRequest]) -> list[Result]:
    """Embed skills outside any run: load and decide, one Ollama call per server, one write.

    Each request gets its own result, so one bad input never fails its neighbours.
    """
    with unscoped(runtime.engine) as conn:
        batch = load_and_decide(runtime, conn, requests)
    fetch_vectors(runtime, batch, urgent=True)
    with unscoped(runtime.engine) as conn:
        return write_vectors(runtime, conn, batch)


@dataclass
class Batch:
    """Requests on their way: decided, then given vectors, then written."""

    requests: list[EmbedRequest]
    results: list[Result | None]  # per request; None while it waits for its vector
    pending: list[Pending]  # those that need a vector
    vectors: list[list[float] | None]  # per pending item

    def name_of(self, skill_id: str) -> str:
        for item in self.pending:
            if item.request.skill_id == skill_id:
                return item.name
        for request, result in zip(self.requests, self.results, strict=True):
            if request.skill_id == skill_id and isinstance(result, Embedded):
                return result.name
        return skill_id

    def fail(self, skill_id: str, error: EmbedderError) -> None:
        """Give the request this error instead of sending it to Ollama."""
        for index, request in enumerate(self.requests):
            if request.skill_id == skill_id:
                self.results[index] = error
        self.pending = [item for item in self.pending if item.request.skill_id != skill_id]
        self.vectors = [None] * len(self.pending)


def load_and_decide(runtime: Runtime, conn: Connection, requests: Sequence[EmbedRequest]) -> Batch:
    """Read each request's skill, settings and stored row in `conn`'s transaction; decide what
    it needs.

    Skills that left `published` lose their row here, in the caller's transaction.
    """
    results: list[Result | None] = [None] * len(requests)
    by_tenant: dict[str, list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        try:
            tenant = request.tenant_id or find_tenant(runtime, request.skill_id)
        except EmbedderError as exc:
            results[index] = exc
            continue
        by_tenant[tenant].append(index)
    pending: list[Pending] = []
    for tenant, indexes in by_tenant.items():
        scope_to_tenant(conn, tenant)
        pending += _decide_tenant(runtime, conn, tenant, [(i, requests[i]) for i in indexes],
                                  results)  # fmt: skip
    return Batch(list(requests), results, pending, [None] * len(pending))


def fetch_vectors(runtime: Runtime, batch: Batch, *, urgent: bool) -> None:
    """Ask the providers for the vectors the batch needs: one call per (server, model, size)."""
    take_vectors(runtime, batch, send_vectors(runtime, batch, urgent=urgent))


@dataclass(frozen=True, slots=True)
class Sent:
    """A batch's requests, answered and not yet parsed: per group of its pending items (their
    positions, server, model and size), the answer, or the error the exchange met."""

    groups: list[tuple[list[int], str, str, int, Answer | EmbedderError]]
    urgent: bool

    @property
    def transient(self) -> TransientError | None:
        """The first transient error an exchange met (the server down or busy), if any."""
        return next((a for *_, a in self.groups if isinstance(a, TransientError)), None)


def send_vectors(
    runtime: Runtime, batch: Batch, *, urgent: bool, on_sent: Callable[[], None] | None = None
) -> Sent:
    """The batch's requests, each answered and read, not parsed: a pipeline sends the next
    batch's request as soon as these are answered, and parses them while the model computes.
    `on_sent` runs as each request goes out (not at all for a request that never left)."""
    groups: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for position, item in enumerate(batch.pending):
        groups[(item.config.ollama_url, item.config.model, item.config.dimensions)].append(position)
    sent = []
    for (url, model, dimensions), positions in groups.items():
        texts = [batch.pending[p].text for p in positions]
        answer: Answer | EmbedderError
        try:
            answer = runtime.providers.for_url(url).send(
                texts, model=model, dimensions=dimensions, urgent=urgent, on_sent=on_sent
            )
        except EmbedderError as exc:
            answer = exc
        sent.append((positions, url, model, dimensions, answer))
    return Sent(sent, urgent)


def take_vectors(runtime: Runtime, batch: Batch, sent: Sent) -> None:
    """Parse the answers into the batch: each item its vector, or its error. A request the
    provider refused (a 400) is halved until the input it refused is alone."""
    for positions, url, model, dimensions, answer in sent.groups:
        answers: list[list[float] | EmbedderError]
        if isinstance(answer, OllamaRejected) and len(positions) > 1:
            # The whole request was refused: its halves go again, until the input is alone.
            texts = [batch.pending[p].text for p in positions]
            provider = runtime.providers.for_url(url)
            middle = len(texts) // 2
            answers = [
                *embed_isolating(provider, texts[:middle], model, dimensions, urgent=sent.urgent),
                *embed_isolating(provider, texts[middle:], model, dimensions, urgent=sent.urgent),
            ]
        elif isinstance(answer, EmbedderError):
            answers = [answer] * len(positions)
        else:
            try:
                answers = list(answer.vectors())
            except EmbedderError as exc:  # the same for every input of the request
                answers = [exc] * len(positions)
        for position, vector in zip(positions, answers, strict=True):
            if isinstance(vector, EmbedderError):
                batch.results[batch.pending[position].index] = vector
            else:
                batch.vectors[position] = vector


def vectors_by_tenant(batch: Batch) -> dict[str, list[tuple[Pending, list[float]]]]:
    """The batch's fetched vectors with their items, per tenant (each tenant's write is scoped)."""
    by_tenant: dict[str, list[tuple[Pending, list[float]]]] = defaultdict(list)
    for item, vector in zip(batch.pending, batch.vectors, strict=True):
        if vector is not None:
            by_tenant[item.tenant_id].append((item, vector))
    return by_tenant


def write_vectors(runtime: Runtime, conn: Connection, batch: Batch) -> list[Result]:
    """Upsert the fetched vectors in `conn`'s transaction, per tenant a statement that locks
    and one that writes; every result."""
    results = list(batch.results)
    for tenant, vectors in vectors_by_tenant(batch).items():
        scope_to_tenant(conn, tenant)
        live = catalog.lock_for_write(conn, tenant, [item.request.skill_id for item, _ in vectors])
        vectors = _same_model(runtime, tenant, live, vectors, results)
        for item, outcome in _write(conn, tenant, vectors):
            results[item.index] = Embedded(outcome, item.name)
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


class WriteTarget(Protocol):
    """Where a batch's vectors go: what each of its skills needs there, and the write."""

    def decide(self, conn: Connection, requests: Sequence[EmbedRequest]) -> Batch: ...

    def write(self, conn: Connection, batch: Batch) -> list[Result]: ...


@dataclass(frozen=True, slots=True)
class LiveTarget:
    """`skill_embeddings`, what the app's search reads: an app job's, and a backfill's."""

    rt: Runtime

    def decide(self, conn: Connection, requests: Sequence[EmbedRequest]) -> Batch:
        return load_and_decide(self.rt, conn, requests)

    def write(self, conn: Connection, batch: Batch) -> list[Result]:
        return write_vectors(self.rt, conn, batch)


def _same_model(
    runtime: Runtime,
    tenant: str,
    live: str | None,
    vectors: list[tuple[Pending, list[float]]],
    results: list[Result | None],
) -> list[tuple[Pending, list[float]]]:
    """The vectors of the tenant's current model (`live`, read under the lock); the others are
    embedded again.

    A model switch may have swapped the tenant's rows since these were asked for: a vector of
    the old model must never land among the new ones.
    """
    if live is None:
        return vectors
    model = live or runtime.settings.ollama_model
    kept = []
    for item, vector in vectors:
        if item.config.model == model:
            kept.append((item, vector))
        else:
            results[item.index] = ModelSwitched(
                f"tenant {tenant!r} switched from {item.config.model} to {model} while"
                f" {item.name} was embedded: it is embedded again with {model}"
            )
    return kept


def _decide_tenant(
    runtime: Runtime,
    conn: Connection,
    tenant: str,
    indexed: list[tuple[int, EmbedRequest]],
    results: list[Result | None],
) -> list[Pending]:
    pending: list[Pending] = []
    removed: list[str] = []
    ids = [request.skill_id for _, request in indexed]
    rows = catalog.load_tenant(conn, tenant, ids)
    config = config_from(runtime, rows.settings)
    skills = rows.skills
    stored = {skill_id: StoredEmbedding(*row) for skill_id, row in rows.stored.items()}
    column = runtime.column_dimensions
    for index, request in indexed:
        skill = skills.get(request.skill_id)
        try:
            if skill is not None and skill.tenant_id != tenant:
                raise TenantMismatch(
                    f"skill {request.skill_id!r} belongs to tenant {skill.tenant_id!r},"
                    f" not {tenant!r}: enqueue it with its own tenant id"
                )
            if skill is None and request.listed:
                results[index] = Embedded(Outcome.DELETED, request.skill_id)
                continue
            if skill is None:
                raise SkillNotFound(
                    f"no skill {request.skill_id!r} in tenant {tenant!r}: check the id"
                )
            decision = decide(skill, stored.get(request.skill_id), config, force=request.force)
            if decision.needs_embedding:
                check_tenant_dimensions(tenant, config, column)
        except PermanentError as exc:
            results[index] = exc
            continue
        if decision.action is Outcome.REMOVED:
            removed.append(request.skill_id)
        if decision.action is not None:
            results[index] = Embedded(decision.action, decision.name)
        else:
            pending.append(Pending(index, request, tenant, decision.name, decision.text, config))
    if removed:
        catalog.delete_embeddings(conn, removed)
    return pending


def check_tenant_dimensions(tenant: str, config: TenantConfig, column: int | None) -> None:
    """The tenant's configured size fits the app's column (DimensionMismatch says the fix)."""
    check_dimensions(
        f"tenant {tenant!r} (site_settings.embedding_dimensions)",
        config.dimensions,
        column_target(column or 0),
        column,
        "fix site_settings.embedding_dimensions or EMBEDDING_DIMENSIONS",
    )


def _write(
    conn: Connection, tenant: str, items: list[tuple[Pending, list[float]]]
) -> list[tuple[Pending, Outcome]]:
    """Upsert the vectors whose skill still has the text we embedded; the rest are superseded.

    The skills are locked (lock_for_write) already; the statement that re-reads them starts
    after, so an edit that landed while Ollama worked wins over this vector.
    """
    rows = [
        catalog.VectorRow(
            item.request.skill_id,
            item.text,
            vector,
            item.config.model,
            item.config.dimensions,
            input_hash(item.text),
        )
        for item, vector in items
    ]
    written = catalog.write_current(conn, tenant, _dedupe(rows))
    outcomes = []
    for (item, _), row in zip(items, rows, strict=True):
        current = (row.skill_id, row.input_hash) in written
        outcomes.append((item, Outcome.EMBEDDED if current else Outcome.SUPERSEDED))
    return outcomes


def _dedupe(rows: list[catalog.VectorRow]) -> list[catalog.VectorRow]:
    # A batch may hold two jobs for one skill: one row per skill and text (the last wins).
    return list({(row.skill_id, row.text): row for row in rows}.values())
