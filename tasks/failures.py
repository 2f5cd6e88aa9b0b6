"""Recording a job's failure so that `python -m worker status --failures` can name it."""

from __future__ import annotations

import logging

from db import failures
from db.session import unscoped
from tasks.context import job_fields
from tasks.embedding import find_tenant
from tasks.errors import EmbedderError
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)


def record_failure(
    rt: Runtime, run_id: str | None, skill_id: str, reason: str, *, attempts: int
) -> str | None:
    """Keep the reason and attempts of a skill's failure; returns its tenant when known.

    In a run, the attempts go on the run's item (its outcome and reason are recorded with the
    run); outside runs, the skill gets a row in `embedding_failures` until it is embedded.
    """
    if run_id is not None:
        with unscoped(rt.sessions) as session:
            return failures.record_run_attempts(session, run_id, skill_id, attempts)
    tenant = job_fields().get("tenant_id") or _tenant_of(rt, skill_id)
    with unscoped(rt.sessions) as session:
        failures.record_failure(session, skill_id, tenant, reason, attempts)
    return tenant


def _tenant_of(rt: Runtime, skill_id: str) -> str | None:
    try:
        return find_tenant(rt, skill_id)
    except EmbedderError:
        return None  # no such skill in any active tenant: the reason already says so
