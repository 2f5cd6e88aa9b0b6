"""A model switch's batches: claimed, fetched and written as a backfill's, into staged_embeddings.

A switch's staging run is a run like a backfill's (tasks.batching: claim -> fetch -> write, the
Ollama slot, crash counts, recovery); only the decision and the write differ. The decision asks
for the switch's model and size; the write goes to `staged_embeddings`, never to live rows, and
only for a skill whose text is still the one embedded and whose switch is still under way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from db import runs, services, staging
from db.models import PUBLISHED
from db.session import driver, scope_to_tenant
from tasks.embedding import (
    Batch,
    Embedded,
    EmbedRequest,
    Outcome,
    Result,
    TenantConfig,
    _Pending,
    load_and_decide,
    tenant_config,
    vectors_by_tenant,
    write_vectors,
)
from tasks.runtime import Runtime
from tasks.text import input_hash, skill_text

logger = logging.getLogger(__name__)


@dataclass
class StagedBatch(Batch):
    """A batch of a switch's staging run: its vectors go to `staged_embeddings`."""

    model: str = ""


def decide_for_run(
    rt: Runtime, session: Session, run_id: str, requests: Sequence[EmbedRequest]
) -> Batch:
    """What a claimed batch needs: a backfill's decision, or a switch's."""
    run = runs.get_run(session, run_id)
    if run is None or run.kind != runs.SWITCH or run.tenant_id is None:
        return load_and_decide(rt, driver(session), requests)
    switch = staging.get_switch(session, run.tenant_id)
    model = run.model or ""
    if switch is None or switch.model != model:  # cancelled: its items get an outcome anyway
        return _skipped(requests, model)
    return decide_staging(rt, session, switch, requests)


def _skipped(requests: Sequence[EmbedRequest], model: str) -> StagedBatch:
    results: list[Result | None] = [Embedded(Outcome.SUPERSEDED, r.skill_id) for r in requests]
    return StagedBatch(list(requests), results, [], [], model=model)


def decide_staging(
    rt: Runtime, session: Session, switch: staging.Switch, requests: Sequence[EmbedRequest]
) -> StagedBatch:
    """Each published skill needs the switch's model's vector of its text, unless staged already."""
    tenant = switch.tenant_id
    scope_to_tenant(session, tenant)
    live = tenant_config(rt, session, tenant)
    config = TenantConfig(True, live.ollama_url, switch.model, switch.dimensions)
    ids = [request.skill_id for request in requests]
    skills = {s.id: s for s in services.get_skills(session, ids)}
    staged = staging.get_staged(session, tenant, ids)
    results: list[Result | None] = [None] * len(requests)
    pending: list[_Pending] = []
    gone: list[str] = []
    for index, request in enumerate(requests):
        skill = skills.get(request.skill_id)
        if skill is None or skill.tenant_id != tenant or skill.status != PUBLISHED:
            gone.append(request.skill_id)
            results[index] = Embedded(Outcome.REMOVED, skill.name if skill else request.skill_id)
            continue
        text = skill_text(skill.name, skill.description)
        if staged.get(skill.id) == f"{switch.model} {input_hash(text)}" and not request.force:
            results[index] = Embedded(Outcome.UNCHANGED, skill.name)
            continue
        pending.append(_Pending(index, request, tenant, skill.name, text, config))
    if gone:
        staging.delete_staged(session, tenant, gone)
    return StagedBatch(list(requests), results, pending, [None] * len(pending), model=switch.model)


def write_for_run(rt: Runtime, session: Session, batch: Batch) -> list[Result]:
    """Write a claimed batch: live rows for a backfill, staged rows for a switch."""
    if isinstance(batch, StagedBatch):
        return write_staged(session, batch)
    return write_vectors(rt, driver(session), batch)


def write_staged(session: Session, batch: StagedBatch) -> list[Result]:
    """Stage the vectors whose skill still has the text embedded, while its switch is under way."""
    results = list(batch.results)
    for tenant, items in vectors_by_tenant(batch).items():
        scope_to_tenant(session, tenant)
        ids = [item.request.skill_id for item, _ in items]
        # The same locks as a live write: an edit's job and this batch never cross.
        services.lock_skills(session, tenant, ids)
        # FOR SHARE: the swap (FOR UPDATE) waits for this write, or this write sees it done.
        switch = staging.get_switch(session, tenant, lock="FOR SHARE")
        current = {s.id: s for s in services.get_skills(session, ids)}
        rows = []
        for item, vector in items:
            skill = current.get(item.request.skill_id)
            if (
                switch is None
                or switch.model != batch.model
                or skill is None
                or skill.status != PUBLISHED
                or skill_text(skill.name, skill.description) != item.text
            ):
                results[item.index] = Embedded(Outcome.SUPERSEDED, item.name)
                continue
            rows.append(
                {
                    "tenant_id": tenant,
                    "skill_id": skill.id,
                    "embedding": vector,
                    "model_name": batch.model,
                    "dimensions": item.config.dimensions,
                    "input_hash": input_hash(item.text),
                }
            )
            results[item.index] = Embedded(Outcome.EMBEDDED, item.name)
        staging.upsert_staged(session, list({row["skill_id"]: row for row in rows}.values()))
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]
