"""The end of an item's life: its outcome counted and logged, the run's close, its summary line.

Batches (tasks.loops) and jobs (tasks.jobs) record outcomes in PostgreSQL; this module turns
what they recorded into the lines an operator follows (`[12/145] Embedded: ...`), the metrics,
and the failures `python -m worker status --failures` names. It holds the wording of a run's
summary, the one line every run ends with (`SUMMARIES`), and closes a run through the closer
its kind registered in the runtime's hooks (a backfill's: tasks.backfill.RunCloser).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Connection

from db import catalog, failures, runs
from db.sql import unscoped
from tasks.metrics import count_job_outcome, count_outcomes, job_fields
from tasks.retry import EmbedderError, describe
from tasks.runtime import Runtime

if TYPE_CHECKING:
    from tasks.embedding import Result

logger = logging.getLogger(__name__)

# A run's one summary line, by its kind: X (current at its end) + Z (failed) = Y (the published
# skills it covers at its end). Skills of the run that left the catalog get LEFT_CATALOG after.
SUMMARIES = {
    runs.BACKFILL: "Done. Embedded {current}/{total} skills. {failed} failures.",
    runs.SWITCH: "Done. Staged {current}/{total} skills for {model}. {failed} failures.",
}
LEFT_CATALOG = "{left} {skills} left the catalog during the run ({unpublished} unpublished, {deleted} deleted)."  # noqa: E501


def summary(state: runs.RunState) -> str:
    return SUMMARIES[state.kind].format(
        current=state.current, total=state.total, failed=state.failed, model=state.model
    )


def left_catalog(state: runs.RunState) -> str | None:
    """The line after the summary, for skills of the run that left the catalog meanwhile."""
    if not state.left:
        return None
    return LEFT_CATALOG.format(
        left=state.left,
        skills="skill" if state.left == 1 else "skills",
        unpublished=state.unpublished,
        deleted=state.deleted,
    )


class Closer(Protocol):
    """How a kind of run closes: its final counts from the catalog (db.runs.Closer), the items
    it handed back meanwhile, and what follows once the close committed."""

    reopened: list[str]

    def __call__(self, conn: Connection, run_id: str) -> runs.Final | None: ...

    def closed(self, state: runs.RunState) -> None: ...


class Closing:
    """The closer for a run's kind, from the runtime's hooks (db.runs.Closers); what it did."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.closer: Closer | None = None

    def for_kind(self, kind: str) -> Closer:
        factory = self.rt.hooks.closers.get(kind)
        if factory is None:
            raise RuntimeError(f"no closer registered for runs of kind {kind!r}")
        closer: Closer = factory(self.rt)
        self.closer = closer
        return closer

    @property
    def reopened(self) -> list[str]:
        return self.closer.reopened if self.closer is not None else []


class ProgressLog:
    """Records jobs' outcomes in their run and writes the lines an operator follows."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def finished(self, outcome: str, name: str) -> None:
        """A job outside any run (a run's outcomes are recorded by its batches)."""
        logger.info("%s: %s", outcome.capitalize(), name)
        count_job_outcome(outcome)

    def recorded(
        self,
        recorded: runs.Recorded,
        results: Mapping[str, Result],
        tenants: Mapping[str, str],
        closing: Closing | None = None,
    ) -> None:
        """One line per outcome a batch has just committed, and the summary if it ended the run."""
        state = recorded.state
        first = state.done - len(recorded.skill_ids)
        for number, skill_id in enumerate(recorded.skill_ids, start=first + 1):
            result = results[skill_id]
            tenant = tenants[skill_id]
            ids = {"skill_id": skill_id, "run_id": state.id, "tenant_id": tenant}
            if isinstance(result, EmbedderError):
                count_outcomes(tenant, runs.FAILED)
                logger.warning(
                    "[%d/%d] Failed: %s: %s", number, state.total, skill_id, describe(result),
                    extra=ids,
                )  # fmt: skip
            else:
                count_outcomes(tenant, result.outcome.value)
                outcome = result.outcome.value.capitalize()
                logger.info("[%d/%d] %s: %s", number, state.total, outcome, result.name, extra=ids)
        if recorded.finished:
            self.closed(state, closing)

    def closed(self, state: runs.RunState, closing: Closing | None = None) -> None:
        """The run's one summary line, the skills that left the catalog on one of their own,
        then what its kind does once closed (a switch's swap line)."""
        logger.info(summary(state), extra={"run_id": state.id})
        if (left := left_catalog(state)) is not None:
            logger.info(left, extra={"run_id": state.id})
        if closing is not None and closing.closer is not None:
            closing.closer.closed(state)

    def failed(self, run_id: str | None, skill_id: str, reason: str, retries: int) -> None:
        tries = f" after {retries + 1} attempts" if retries else ""
        tenant = record_failure(self.rt, run_id, skill_id, reason, attempts=retries + 1)
        if run_id is None:
            count_outcomes(tenant, "failed")
            logger.warning("Failed%s: %s: %s", tries, skill_id, reason)
            return
        closing = Closing(self.rt)
        with unscoped(self.rt.engine) as conn:
            recorded = runs.record_outcome(conn, run_id, skill_id, "failed", reason, close=closing)
        if recorded is not None:
            count_outcomes(tenant, "failed")
            state, closed = recorded
            logger.warning(
                "[%d/%d] Failed%s: %s: %s", state.done, state.total, tries, skill_id, reason
            )
            if closed:
                self.closed(state, closing)


def record_failure(
    rt: Runtime, run_id: str | None, skill_id: str, reason: str, *, attempts: int
) -> str | None:
    """Keep the reason and attempts of a skill's failure; returns its tenant when known.

    In a run, the attempts go on the run's item (its outcome and reason are recorded with the
    run); outside runs, the skill gets a row in `embedding_failures` until it is embedded.
    """
    with unscoped(rt.engine) as conn:
        if run_id is not None:
            return failures.record_run_attempts(conn, run_id, skill_id, attempts)
        tenant = job_fields().get("tenant_id") or catalog.find_tenant(
            conn, skill_id, rt.settings.default_tenant_id
        )
        failures.record_failure(conn, skill_id, tenant, reason, attempts)
    return tenant
