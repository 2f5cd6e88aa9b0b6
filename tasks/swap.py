"""The end of a model switch: once its staging run closes, the swap, in one transaction.

`settle` runs when a staging run closes (tasks.progress), after an edit is staged, and on
every recovery pass: once every published skill of the tenant has a staged vector of its
current text, db.staging.swap writes them into `skill_embeddings` with the tenant's setting.
If an edit left a skill unstaged, a top-up staging is queued instead; with failures, nothing.
"""

from __future__ import annotations

import logging
import time

from celery import current_app

from db import runs, staging
from db.session import tenant_scope, unscoped
from tasks.errors import database_error
from tasks.queues import INTERACTIVE
from tasks.retry import describe
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)

STAGE_SWITCH = "tasks.stage_switch"  # starts (or tops up) a tenant's staging run
SWAP_ATTEMPTS = 3


def run_closed(rt: Runtime, state: runs.RunState) -> None:
    """A run's summary was logged: if it staged a switch, swap now if everything is staged."""
    if state.kind != runs.SWITCH or state.tenant_id is None:
        return
    try:
        settle(rt, state.tenant_id)
    except Exception as exc:
        # The recovery pass settles it again in a few seconds.
        logger.warning("Could not settle the switch of %s: %s", state.tenant_id,
                       describe(database_error(exc) or exc))  # fmt: skip


def settle(rt: Runtime, tenant: str) -> staging.Swapped | None:
    """Swap the tenant's switch if its staging is complete; ask for more staging if an edit
    left a skill without a staged vector; nothing while staging runs or after failures."""
    with unscoped(rt.sessions) as session:
        switch = staging.get_switch(session, tenant)
        run = runs.get_run(session, switch.run_id) if switch and switch.run_id else None
    if switch is None or run is None or run.finished_at is None or run.failed:
        return None
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        started = time.monotonic()
        try:
            with tenant_scope(rt.sessions, tenant) as session:
                outcome = staging.swap(session, tenant)
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
    with unscoped(rt.sessions) as session:
        switches = staging.list_switches(session)
        staging_now = any(
            (run := runs.get_run(session, s.run_id)) is not None and run.finished_at is None
            for s in switches
            if s.run_id
        )
    waiting = [s for s in switches if s.run_id is None]
    if waiting and not staging_now:
        request_staging(waiting[0].tenant_id)


def settle_all(rt: Runtime) -> None:
    """The recovery pass: settle every switch (a swap missed by a worker that died), and move
    the queue of tenants on."""
    with unscoped(rt.sessions) as session:
        switches = staging.list_switches(session)
    if not switches:
        return
    for switch in switches:
        settle(rt, switch.tenant_id)
    start_next(rt)
