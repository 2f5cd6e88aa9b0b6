"""How a run ends: its summary counts what the catalog holds at the end, not what it planned.

Y is the run's skills still published, X those of them current (whichever job made them so),
Z those that failed; skills that left the catalog are counted apart. A skill still published
but no longer current (edited after its batch, its app job not yet done) goes back to the run,
which embeds it again before it closes: so X + Z = Y, exactly.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from db import run_close, runs
from db.session import scope_to_tenant
from tasks.embedding import tenant_config
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)


class RunCloser:
    """A `runs.Closer`: given to whatever records a run's outcomes; notes what it handed back."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.reopened: list[str] = []

    def __call__(self, session: Session, run_id: str) -> runs.Final | None:
        tallies = []
        for tenant in run_close.run_tenants(session, run_id):
            scope_to_tenant(session, tenant)
            config = tenant_config(self.rt, session, tenant)
            tallies.append(
                run_close.tally(
                    session, run_id, tenant, model=config.model, dimensions=config.dimensions
                )
            )
        redo = [skill_id for tally in tallies for skill_id in tally.redo]
        if redo:
            run_close.reopen(session, run_id, redo)
            self.reopened = redo
            logger.info(
                "%d skills of run %s changed after their batch: embedding them again before"
                " the summary",
                len(redo),
                run_id,
                extra={"run_id": run_id},
            )
            return None
        return runs.Final(
            embedded=sum(t.embedded for t in tallies),
            unchanged=sum(t.unchanged for t in tallies),
            failed=sum(t.failed for t in tallies),
            skipped=sum(t.skipped for t in tallies),
            unpublished=sum(t.unpublished for t in tallies),
            deleted=sum(t.deleted for t in tallies),
        )
