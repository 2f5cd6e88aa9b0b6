"""Switch a tenant's embedding model with no moment where its search reads two models.

1. `start_switch` refuses, before writing anything, a model that is not pulled, whose vectors
   do not fit the app's column, or a tenant whose switch is under way; else it records the
   switch and starts its staging run: a run like a backfill's (one job per skill, batched by
   tasks.loops), whose write target is `staged_embeddings`, never live rows.
2. Its close (SwitchCloser, in the transaction that records its last outcome) counts the
   tenant's catalog against the staged vectors, as a backfill's counts the live ones: a skill
   edited after its batch or published during the run goes back to the run, so it ends with one
   summary where X + Z = Y. With no failure, the same transaction swaps: the staged vectors go
   into `skill_embeddings` with the setting. With failures the switch stalls: the operator
   retries (`switch-model` again) or cancels.
Without a tenant, every active tenant switches, one after another: the next one's staging
starts when the previous one has swapped.

Nothing of the live path imports this module: it plugs in through the runtime's hooks, below
(its runs' write target and close, the recovery pass, and the stage of an edit after a live
write while a switch is under way).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import current_app
from sqlalchemy import Connection

from db import catalog, run_close, runs, staging
from db.catalog import PUBLISHED, input_hash, skill_text
from db.sql import scope_to_tenant, tenant_scope, unscoped
from tasks import INTERACTIVE
from tasks.backfill import Continuation, Enqueuer, fan_out
from tasks.embedding import (
    Batch,
    Embedded,
    EmbedRequest,
    Outcome,
    Pending,
    Result,
    TenantConfig,
    fetch_vectors,
    find_tenant,
    tenant_config,
    vectors_by_tenant,
)
from tasks.provider import check_dimensions, column_target, ready
from tasks.retry import (
    EmbedderError,
    PermanentError,
    UnknownTenant,
    database_error,
    describe,
)
from tasks.runtime import HOOKS, Runtime

logger = logging.getLogger(__name__)

STAGE_SWITCH = "tasks.stage_switch"  # starts (or tops up) a tenant's staging run
SWAP_ATTEMPTS = 3
# How long this process trusts its last look at which tenants switch, after a live write: an
# edit it misses is staged by the run's close all the same.
SWITCHES_SECONDS = 1.0


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
    with unscoped(rt.engine) as conn:
        for position, (tenant, current) in enumerate(plan.tenants):
            if tenant not in plan.retry and not staging.add_switch(
                conn, tenant, model=model, dimensions=plan.dimensions, from_model=current,
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
    with unscoped(rt.engine) as conn:
        active = catalog.list_active_tenants(conn)
        under_way = {s.tenant_id: s for s in staging.list_switches(conn)}
    if tenant_id is not None and tenant_id not in active:
        raise UnknownTenant(f"tenant {tenant_id!r} does not exist or is not active: check the id")
    candidates = [tenant_id] if tenant_id is not None else active
    tenants: list[tuple[str, str, str]] = []  # (tenant, its Ollama, its model now)
    for tenant in candidates:
        with tenant_scope(rt.engine, tenant) as conn:
            config = tenant_config(rt, conn, tenant)
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
    with unscoped(rt.engine) as conn:
        run = runs.get_run(conn, switch.run_id)
    return run is not None and run.finished_at is not None and run.failed > 0


def _preflight(rt: Runtime, model: str, urls: set[str]) -> int:
    """Each provider is up and has `model`, whose vectors fit the app's column; their size."""
    column = rt.column_dimensions
    size = column or 0
    for url in sorted(urls):
        try:
            size = ready(rt.providers.for_url(url), model)
            check_dimensions(f"model {model!r}", size, column_target(column or 0), column,
                             "the app's schema must change first")  # fmt: skip
        except EmbedderError as exc:
            raise SwitchRefused(f"Switch refused: {exc}") from None
    return size


def begin_staging(rt: Runtime, tenant: str, stager: Stager) -> str | None:
    """Start a staging run for the tenant's switch: its published skills without a current
    staged vector, one job each. None when its switch is gone or another process started it."""
    with unscoped(rt.engine) as conn:
        switch = staging.get_switch(conn, tenant)
        run = runs.get_run(conn, switch.run_id) if switch and switch.run_id else None
    if switch is None or (run is not None and run.finished_at is None):
        return None
    run_id = staging.new_run_id()
    with tenant_scope(rt.engine, tenant) as conn:
        if not staging.start_run(conn, switch, run_id):
            return None
        published, queued = staging.add_staging_items(conn, run_id, tenant, switch.model)
    switching.forget()  # this process's app jobs stage their edits from now on
    logger.info(
        "Switch of tenant %s to %s: staging %d of its %d published skills (run %s)",
        tenant, switch.model, queued, published, run_id,
    )  # fmt: skip
    if stager.before_fanout is not None and queued:
        stager.before_fanout(run_id)
    # A run with nothing to stage closes (and swaps) as its fan-out ends.
    fan_out(rt, stager.task, run_id, force=False, continue_later=stager.continue_later,
            handed_back=stager.before_fanout)  # fmt: skip
    return run_id


def cancel_switch(rt: Runtime, tenant: str) -> staging.Switch | None:
    """Drop the tenant's staged vectors and its switch; nothing live changes."""
    with unscoped(rt.engine) as conn:
        switch = staging.drop_switch(conn, tenant)
    if switch is not None:
        logger.info("Switch of tenant %s to %s cancelled: staged vectors dropped", tenant,
                    switch.model)  # fmt: skip
    return switch


class Switching:
    """Which tenants switch, as this process last looked (at most SWITCHES_SECONDS ago)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: tuple[float, dict[str, staging.Switch]] = (-SWITCHES_SECONDS, {})

    def now(self, rt: Runtime) -> dict[str, staging.Switch]:
        with self._lock:
            at, seen = self._seen
            if time.monotonic() - at < SWITCHES_SECONDS:
                return seen
        with unscoped(rt.engine) as conn:
            seen = {s.tenant_id: s for s in staging.list_switches(conn) if s.run_id}
        with self._lock:
            self._seen = (time.monotonic(), seen)
        return seen

    def forget(self) -> None:
        """Look again next time (a switch just started or ended in this process)."""
        with self._lock:
            self._seen = (-SWITCHES_SECONDS, {})


switching = Switching()


def stage_edits(rt: Runtime, requests: Sequence[EmbedRequest], results: Sequence[Result]) -> None:
    """After an app job wrote a skill's live vector: while its tenant switches, stage the new
    model's vector of the same text too (an unpublished skill loses its staged row), so the
    staging run's close has less to redo. What fails or is missed here, the close stages."""
    switches = switching.now(rt)
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
            with unscoped(rt.engine) as conn:
                batch = decide_staging(rt, conn, switch, [request])
            fetch_vectors(rt, batch, urgent=True)
            with unscoped(rt.engine) as conn:
                write_staged(conn, batch, switch.model)
        except Exception as exc:
            error = exc if isinstance(exc, EmbedderError) else database_error(exc)
            if error is None:
                raise
            logger.warning("Could not stage %s for the switch: %s", request.skill_id,
                           describe(error))  # fmt: skip


@dataclass(frozen=True, slots=True)
class StagingTarget:
    """A staging run's write target: the switch's model's vectors, into `staged_embeddings`."""

    rt: Runtime
    switch: staging.Switch | None  # None: cancelled, or replaced by another switch
    model: str

    def decide(self, conn: Connection, requests: Sequence[EmbedRequest]) -> Batch:
        if self.switch is None:  # its items get an outcome anyway, and nothing is staged
            results: list[Result | None] = [
                Embedded(Outcome.SUPERSEDED, r.skill_id) for r in requests
            ]
            return Batch(list(requests), results, [], [])
        return decide_staging(self.rt, conn, self.switch, requests)

    def write(self, conn: Connection, batch: Batch) -> list[Result]:
        return write_staged(conn, batch, self.model)


def staging_target(rt: Runtime, conn: Connection, run: runs.RunState) -> StagingTarget:
    switch = staging.get_switch(conn, run.tenant_id) if run.tenant_id else None
    if switch is not None and switch.model != run.model:
        switch = None
    return StagingTarget(rt, switch, run.model or "")


def decide_staging(
    rt: Runtime, conn: Connection, switch: staging.Switch, requests: Sequence[EmbedRequest]
) -> Batch:
    """Each published skill needs the switch's model's vector of its text, unless staged already."""
    tenant = switch.tenant_id
    scope_to_tenant(conn, tenant)
    live = tenant_config(rt, conn, tenant)
    config = TenantConfig(True, live.ollama_url, switch.model, switch.dimensions)
    ids = [request.skill_id for request in requests]
    skills = {s.id: s for s in catalog.get_skills(conn, ids)}
    staged = staging.get_staged(conn, tenant, ids)
    results: list[Result | None] = [None] * len(requests)
    pending: list[Pending] = []
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
        pending.append(Pending(index, request, tenant, skill.name, text, config))
    if gone:
        staging.delete_staged(conn, tenant, gone)
    return Batch(list(requests), results, pending, [None] * len(pending))


def write_staged(conn: Connection, batch: Batch, model: str) -> list[Result]:
    """Stage the vectors whose skill still has the text embedded, while its switch is under way."""
    results = list(batch.results)
    for tenant, items in vectors_by_tenant(batch).items():
        scope_to_tenant(conn, tenant)
        ids = [item.request.skill_id for item, _ in items]
        # The same locks as a live write: an edit's job and this batch never cross.
        catalog.lock_skills(conn, tenant, ids)
        # FOR SHARE: the swap (FOR UPDATE) waits for this write, or this write sees it done.
        switch = staging.get_switch(conn, tenant, lock="FOR SHARE")
        current = {s.id: s for s in catalog.get_skills(conn, ids)}
        rows = []
        for item, vector in items:
            skill = current.get(item.request.skill_id)
            if (
                switch is None
                or switch.model != model
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
                    "model_name": model,
                    "dimensions": item.config.dimensions,
                    "input_hash": input_hash(item.text),
                }
            )
            results[item.index] = Embedded(Outcome.EMBEDDED, item.name)
        staging.upsert_staged(conn, list({row["skill_id"]: row for row in rows}.values()))
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


class SwitchCloser:
    """A staging run's close (a tasks.progress.Closer): the tenant's catalog counted against
    its staged vectors; with no failure, the swap, in the same transaction."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.reopened: list[str] = []
        self.switch: staging.Switch | None = None
        self.swapped: staging.Swapped | None = None
        self.started = 0.0

    def __call__(self, conn: Connection, run_id: str) -> runs.Final | None:
        run = runs.get_run(conn, run_id)
        assert run is not None
        assert run.tenant_id is not None
        tenant, model = run.tenant_id, run.model or ""
        # FOR UPDATE before the count: no staged write of this switch lands between the count
        # and the swap (each holds the row FOR SHARE).
        switch = staging.get_switch(conn, tenant, lock="FOR UPDATE")
        if switch is None or switch.run_id != run_id or switch.model != model:
            return _as_recorded(run)  # cancelled: its counts as they are
        self.switch = switch
        scope_to_tenant(conn, tenant)
        tally = run_close.tally(conn, run_id, tenant, model=model, dimensions=switch.dimensions,
                                vectors="staged_embeddings")  # fmt: skip
        if tally.redo or tally.arrived:
            run_close.reopen(conn, run_id, tally.redo, [(tenant, s) for s in tally.arrived],
                             tally.others)  # fmt: skip
            self.reopened = tally.redo + tally.arrived
            logger.info(
                "Switch of tenant %s to %s: %d skills changed after their batch and %d were"
                " published during staging: staging them before the summary",
                tenant, model, len(tally.redo), len(tally.arrived), extra={"run_id": run_id},
            )  # fmt: skip
            return None
        if not tally.failed:
            self.started = time.monotonic()
            try:
                outcome = staging.swap(conn, tenant)
            except Exception as exc:
                # The batch that closed the run is rolled back with it: its items are free, the
                # next claim embeds them again and closes the run, and this swap with it.
                if (error := database_error(exc)) is not None:
                    logger.warning("The swap of tenant %s to %s was rolled back (%s): trying again",
                                   tenant, model, describe(error))  # fmt: skip
                raise
            self.swapped = outcome if isinstance(outcome, staging.Swapped) else None
        return runs.Final(
            embedded=tally.embedded,
            unchanged=tally.unchanged + tally.others,
            failed=tally.failed,
            skipped=tally.skipped,
            unpublished=tally.unpublished,
            deleted=tally.deleted,
        )

    def closed(self, state: runs.RunState) -> None:
        """After the summary: the swap's line, or why the switch waits; the next tenant's turn."""
        switch = self.switch
        if switch is None:
            return
        if self.swapped is not None:
            swapped = self.swapped
            logger.info(
                "Swapped tenant %s from %s to %s in one transaction: %d vectors written, %d rows"
                " of unpublished skills removed, in %.2f s",
                switch.tenant_id, switch.from_model, switch.model, swapped.vectors,
                swapped.removed, time.monotonic() - self.started,
            )  # fmt: skip
        elif state.failed:
            logger.warning(
                "Switch of tenant %s to %s stalled: %d skills failed to stage; retry them with"
                " `python -m worker switch-model %s --tenant %s`, or cancel with --cancel",
                switch.tenant_id, switch.model, state.failed, switch.model, switch.tenant_id,
            )  # fmt: skip
        try:
            start_next(self.rt)
        except Exception as exc:  # the recovery pass moves the queue on in a few seconds
            logger.warning("Could not start the next switch: %s",
                           describe(database_error(exc) or exc))  # fmt: skip


def _as_recorded(run: runs.RunState) -> runs.Final:
    return runs.Final(run.embedded, run.unchanged, run.failed, run.skipped, run.unpublished,
                      run.deleted)  # fmt: skip


def settle(rt: Runtime, tenant: str) -> staging.Swapped | None:
    """Swap the tenant's switch if its staging is complete; ask for more staging if an edit
    left a skill without a staged vector; nothing while staging runs or after failures."""
    with unscoped(rt.engine) as conn:
        switch = staging.get_switch(conn, tenant)
        run = runs.get_run(conn, switch.run_id) if switch and switch.run_id else None
    if switch is None or run is None or run.finished_at is None or run.failed:
        return None
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        started = time.monotonic()
        try:
            with tenant_scope(rt.engine, tenant) as conn:
                outcome = staging.swap(conn, tenant)
            break
        except Exception as exc:
            error = database_error(exc)
            if error is None or attempt == SWAP_ATTEMPTS:
                raise
            logger.warning("The swap of tenant %s to %s was rolled back (%s): trying again",
                           tenant, switch.model, describe(error))  # fmt: skip
            time.sleep(0.2 * attempt)
    if isinstance(outcome, staging.StagedCount):
        logger.info(
            "Switch of tenant %s to %s: %d published skills changed during staging: staging them",
            tenant, switch.model, outcome.missing,
        )  # fmt: skip
        request_staging(tenant)
        return None
    if outcome is None:
        return None
    logger.info(
        "Swapped tenant %s from %s to %s in one transaction: %d vectors written, %d rows of"
        " unpublished skills removed, in %.2f s",
        tenant, switch.from_model, switch.model, outcome.vectors, outcome.removed,
        time.monotonic() - started,
    )  # fmt: skip
    start_next(rt)
    return outcome


def request_staging(tenant: str) -> None:
    """Queue tasks.stage_switch for the tenant (from a thread that holds no task handle)."""
    current_app.send_task(STAGE_SWITCH, kwargs={"tenant_id": tenant}, queue=INTERACTIVE)


def start_next(rt: Runtime) -> None:
    """Queue the staging of the next waiting tenant once no other switch is staging."""
    with unscoped(rt.engine) as conn:
        switches = staging.list_switches(conn)
        staging_now = any(
            (run := runs.get_run(conn, s.run_id)) is not None and run.finished_at is None
            for s in switches
            if s.run_id
        )
    waiting = [s for s in switches if s.run_id is None]
    if waiting and not staging_now:
        request_staging(waiting[0].tenant_id)


def settle_all(rt: Runtime) -> None:
    """The recovery pass: settle every switch (a swap missed by a worker that died), and move
    the queue of tenants on."""
    with unscoped(rt.engine) as conn:
        switches = staging.list_switches(conn)
    if not switches:
        return
    for switch in switches:
        settle(rt, switch.tenant_id)
    start_next(rt)


HOOKS.targets[runs.SWITCH] = staging_target
HOOKS.closers[runs.SWITCH] = SwitchCloser
HOOKS.recovery.append(settle_all)
HOOKS.after_live_write.append(stage_edits)
