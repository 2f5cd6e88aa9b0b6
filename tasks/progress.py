"""The end of an item's life: its outcome counted and logged, and the run's summary line.

Batches (tasks.batching) and jobs (tasks.jobs) record outcomes in PostgreSQL; this module turns
what they recorded into the lines an operator follows (`[12/145] Embedded: ...`, `Done. ...`)
and the metrics, and keeps the failures `python -m worker status --failures` names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from db import runs
from db.session import unscoped
from tasks.closing import RunCloser
from tasks.embedding import Embedded, Result
from tasks.failures import record_failure
from tasks.metrics import count_job_outcome, count_outcomes
from tasks.retry import describe
from tasks.runtime import Runtime
from tasks.swap import run_closed

logger = logging.getLogger(__name__)


class ProgressLog:
    """Records jobs' outcomes in their run and writes the lines an operator follows."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def finished(self, outcome: str, name: str) -> None:
        """A job outside any run (a run's outcomes are recorded by its batches)."""
        logger.info("%s: %s", outcome.capitalize(), name)
        count_job_outcome(outcome)

    def recorded(
        self, recorded: runs.Recorded, results: Mapping[str, Result], tenants: Mapping[str, str]
    ) -> None:
        """One line per outcome a batch has just committed, and the summary if it ended the run."""
        state = recorded.state
        first = state.done - len(recorded.skill_ids)
        for number, skill_id in enumerate(recorded.skill_ids, start=first + 1):
            result = results[skill_id]
            tenant = tenants[skill_id]
            ids = {"skill_id": skill_id, "run_id": state.id, "tenant_id": tenant}
            if isinstance(result, Embedded):
                count_outcomes(tenant, result.outcome.value)
                outcome = result.outcome.value.capitalize()
                logger.info("[%d/%d] %s: %s", number, state.total, outcome, result.name, extra=ids)
            else:
                count_outcomes(tenant, runs.FAILED)
                logger.warning(
                    "[%d/%d] Failed: %s: %s", number, state.total, skill_id, describe(result),
                    extra=ids,
                )  # fmt: skip
        if recorded.finished:
            self.closed(state)

    def closed(self, state: runs.RunState) -> None:
        """The run's one summary line, the skills that left the catalog on one of their own,
        then what follows a run's end (a switch's swap)."""
        logger.info(state.summary, extra={"run_id": state.id})
        if state.left_catalog is not None:
            logger.info(state.left_catalog, extra={"run_id": state.id})
        run_closed(self.rt, state)

    def failed(self, run_id: str | None, skill_id: str, reason: str, retries: int) -> None:
        tries = f" after {retries + 1} attempts" if retries else ""
        tenant = record_failure(self.rt, run_id, skill_id, reason, attempts=retries + 1)
        if run_id is None:
            count_outcomes(tenant, "failed")
            logger.warning("Failed%s: %s: %s", tries, skill_id, reason)
            return
        with unscoped(self.rt.sessions) as session:
            recorded = runs.record_outcome(
                session, run_id, skill_id, "failed", reason, close=RunCloser(self.rt)
            )
        if recorded is not None:
            count_outcomes(tenant, "failed")
            state, closed = recorded
            logger.warning(
                "[%d/%d] Failed%s: %s: %s", state.done, state.total, tries, skill_id, reason
            )
            if closed:
                self.closed(state)
