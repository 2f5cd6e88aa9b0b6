"""Switch a tenant's embedding model with no moment where its search reads two models.

1. `start_switch` refuses, before writing anything, a model that is not pulled, whose vectors
   do not fit the app's column, or a tenant whose switch is under way; else it records the
   switch and starts its staging run (tasks.staging: one job per skill, batched as a backfill).
2. Its end is tasks.swap: once every published skill has a staged vector of its current
   text, the staged vectors go into `skill_embeddings` with the setting, in one transaction.
   A run with failures stalls the switch: the operator retries (`switch-model` again) or cancels.
Without a tenant, every active tenant switches, one after another: the next one's staging
starts when the previous one has swapped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from db import runs, services, staging
from db.session import tenant_scope, unscoped
from tasks.backfill import Continuation, Enqueuer, fan_out
from tasks.embedding import (
    Embedded,
    EmbedRequest,
    Outcome,
    Result,
    fetch_vectors,
    find_tenant,
    tenant_config,
)
from tasks.errors import (
    DimensionMismatch,
    EmbedderError,
    ModelCannotEmbed,
    PermanentError,
    UnknownTenant,
    database_error,
)
from tasks.retry import describe
from tasks.runtime import Runtime
from tasks.staging import decide_staging, write_staged
from tasks.swap import settle

logger = logging.getLogger(__name__)


class SwitchRefused(PermanentError):
    """The switch was not started; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Stager:
    """What starting a staging run needs from tasks.jobs: the job to queue per skill."""

    task: Enqueuer
    before_fanout: Callable[[str], None] | None = None
    continue_later: Continuation | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A switch that passed every check: the tenants in turn, (tenant, its model now)."""

    model: str
    dimensions: int
    tenants: list[tuple[str, str]]
    retry: set[str]  # tenants whose stalled switch to the same model starts again


def start_switch(rt: Runtime, model: str, tenant_id: str | None, stager: Stager) -> dict[str, Any]:
    """Check, record and start a switch of one tenant (or every active one) to `model`."""
    plan = plan_switch(rt, model, tenant_id)
    with unscoped(rt.sessions) as session:
        for position, (tenant, current) in enumerate(plan.tenants):
            if tenant not in plan.retry and not staging.add_switch(
                session, tenant, model=model, dimensions=plan.dimensions, from_model=current,
                position=position,
            ):  # fmt: skip
                raise SwitchRefused(f"Switch refused: tenant {tenant!r} is already switching")
    started = []
    # One after another: the first stages now, the next once the previous one has swapped.
    for tenant, current in plan.tenants[:1] if tenant_id is None else plan.tenants:
        logger.info("Switch of tenant %s from %s to %s requested", tenant, current, model)
        started.append({"tenant_id": tenant, "run_id": begin_staging(rt, tenant, stager)})
    return {"model": model, "dimensions": plan.dimensions,
            "tenants": [t for t, _ in plan.tenants], "started": started}  # fmt: skip


def plan_switch(rt: Runtime, model: str, tenant_id: str | None) -> Plan:
    """Every check of a switch, with nothing written: SwitchRefused says what to fix."""
    with unscoped(rt.sessions) as session:
        active = services.list_active_tenants(session)
        under_way = {s.tenant_id: s for s in staging.list_switches(session)}
    if tenant_id is not None and tenant_id not in active:
        raise UnknownTenant(f"tenant {tenant_id!r} does not exist or is not active: check the id")
    candidates = [tenant_id] if tenant_id is not None else active
    tenants: list[tuple[str, str, str]] = []  # (tenant, its Ollama, its model now)
    for tenant in candidates:
        with tenant_scope(rt.sessions, tenant) as session:
            config = tenant_config(rt, session, tenant)
        if not config.enabled:
            if tenant_id is not None:
                raise SwitchRefused(
                    f"Switch refused: semantic search is off for tenant {tenant!r}: turn it on"
                    " in its site settings first"
                )
            continue
        if config.model == model:
            if tenant_id is not None:
                raise SwitchRefused(f"Switch refused: tenant {tenant!r} already uses {model}")
            continue
        tenants.append((tenant, config.ollama_url, config.model))
    retry = {t for t, _, _ in tenants if _stalled_on(rt, under_way.get(t), model)}
    for tenant, _, _ in tenants:
        if tenant in under_way and tenant not in retry:
            switch = under_way[tenant]
            raise SwitchRefused(
                f"Switch refused: tenant {tenant!r} is already switching to {switch.model}:"
                f" wait for it, or cancel it (python -m worker switch-model --cancel"
                f" --tenant {tenant})"
            )
    if not tenants:
        raise SwitchRefused(f"Switch refused: every active tenant already uses {model}")
    dimensions = _preflight(rt, model, {url for _, url, _ in tenants})
    return Plan(model, dimensions, [(t, current) for t, _, current in tenants], retry)


def _stalled_on(rt: Runtime, switch: staging.Switch | None, model: str) -> bool:
    """The tenant's switch to `model` ended its staging with failures: starting it again retries."""
    if switch is None or switch.model != model or switch.run_id is None:
        return False
    with unscoped(rt.sessions) as session:
        run = runs.get_run(session, switch.run_id)
    return run is not None and run.finished_at is not None and run.failed > 0


def _preflight(rt: Runtime, model: str, urls: set[str]) -> int:
    """Each Ollama is up and has `model`, whose vectors fit the app's column; their size."""
    column = rt.column_dimensions
    size = column or 0
    for url in sorted(urls):
        client = rt.ollama.for_url(url)
        try:
            client.version()
            info = client.show(model)
            if not info.can_embed:
                raise ModelCannotEmbed(f"model {model!r} on {url} is not an embedding model")
            length = info.embedding_length
            if length is None:  # an older server: one probe says the size
                [vector] = client.embed(["size probe"], model=model, dimensions=0)
                length = len(vector)
        except EmbedderError as exc:
            raise SwitchRefused(f"Switch refused: {exc}") from None
        if column is not None and length != column:
            raise SwitchRefused(
                f"Switch refused: {DimensionMismatch.__name__}: model {model!r} makes"
                f" {length}-dimension vectors but the app's skill_embeddings.embedding is"
                f" vector({column}): the app's schema must change first"
            )
        size = length
    return size


def begin_staging(rt: Runtime, tenant: str, stager: Stager) -> str | None:
    """Start a staging run for the tenant's switch: its published skills without a current
    staged vector, one job each. None when its switch is gone or another process started it."""
    with unscoped(rt.sessions) as session:
        switch = staging.get_switch(session, tenant)
        run = runs.get_run(session, switch.run_id) if switch and switch.run_id else None
    if switch is None or (run is not None and run.finished_at is None):
        return None
    run_id = staging.new_run_id()
    with tenant_scope(rt.sessions, tenant) as session:
        if not staging.start_run(session, switch, run_id):
            return None
        published, queued = staging.add_staging_items(session, run_id, tenant, switch.model)
    logger.info(
        "Switch of tenant %s to %s: staging %d of its %d published skills (run %s)",
        tenant, switch.model, queued, published, run_id,
    )  # fmt: skip
    if stager.before_fanout is not None and queued:
        stager.before_fanout(run_id)
    fan_out(rt, stager.task, run_id, force=False, continue_later=stager.continue_later)
    settle(rt, tenant)  # a run with nothing to stage is closed already
    return run_id


def cancel_switch(rt: Runtime, tenant: str) -> staging.Switch | None:
    """Drop the tenant's staged vectors and its switch; nothing live changes."""
    with unscoped(rt.sessions) as session:
        switch = staging.drop_switch(session, tenant)
    if switch is not None:
        logger.info("Switch of tenant %s to %s cancelled: staged vectors dropped", tenant,
                    switch.model)  # fmt: skip
    return switch


def stage_edits(
    rt: Runtime,
    requests: Sequence[EmbedRequest],
    results: Sequence[Result],
    switches: Mapping[str, staging.Switch] | None = None,
) -> None:
    """After an app job wrote a skill's live vector: while its tenant switches, stage the new
    model's vector of the same text too (an unpublished skill loses its staged row), so that
    nothing is stale at the swap. What fails here is staged by the switch's next pass.

    `switches`: the tenants switching as the job's batch saw them (Batch.switches), which
    spares a transaction; None: read them here.
    """
    if switches is None:
        with unscoped(rt.sessions) as session:
            switches = {s.tenant_id: s for s in staging.list_switches(session)}
    switches = {tenant: s for tenant, s in switches.items() if s.run_id}
    if not switches:
        return
    done = (Outcome.EMBEDDED, Outcome.UNCHANGED, Outcome.REMOVED, Outcome.SUPERSEDED)
    for request, result in zip(requests, results, strict=True):
        if not isinstance(result, Embedded) or result.outcome not in done:
            continue
        try:
            tenant = request.tenant_id or find_tenant(rt, request.skill_id)
            switch = switches.get(tenant)
            if switch is None:
                continue
            with unscoped(rt.sessions) as session:
                batch = decide_staging(rt, session, switch, [request])
            fetch_vectors(rt, batch, urgent=True)
            with unscoped(rt.sessions) as session:
                write_staged(session, batch)
            settle(rt, tenant)
        except Exception as exc:
            error = exc if isinstance(exc, EmbedderError) else database_error(exc)
            if error is None:
                raise
            logger.warning("Could not stage %s for the switch: %s", request.skill_id,
                           describe(error))  # fmt: skip
