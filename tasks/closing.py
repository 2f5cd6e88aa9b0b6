"""How a run ends: its summary counts what the catalog holds at the end, not what it planned.

Y is the published skills of the run's tenants at its end, X those of them current (whichever
job made them so), Z those that failed; the run's own skills that left the catalog are counted
apart. A published skill that is not current (edited after its batch, or published during the
run, its app job not yet done) goes back to the run, or joins it, and is embedded before the run
closes: so X + Z = Y, exactly. Skills current at the start are no item of the run: they are
counted from the catalog, so a run over a catalog that changed little writes little.
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
                (
                    tenant,
                    run_close.tally(
                        session, run_id, tenant, model=config.model, dimensions=config.dimensions
                    ),
                )
            )
        redo = [skill_id for _, tally in tallies for skill_id in tally.redo]
        arrived = [(tenant, skill_id) for tenant, tally in tallies for skill_id in tally.arrived]
        if redo or arrived:
            others = sum(tally.others for _, tally in tallies)
            run_close.reopen(session, run_id, redo, arrived, others)
            self.reopened = redo + [skill_id for _, skill_id in arrived]
            logger.info(
                "%d skills of run %s changed after their batch and %d were published during"
                " it: embedding them before the summary",
                len(redo),
                run_id,
                len(arrived),
                extra={"run_id": run_id},
            )
            return None
        counted = [tally for _, tally in tallies]
        return runs.Final(
            embedded=sum(t.embedded for t in counted),
            unchanged=sum(t.unchanged + t.others for t in counted),
            failed=sum(t.failed for t in counted),
            skipped=sum(t.skipped for t in counted),
            unpublished=sum(t.unpublished for t in counted),
            deleted=sum(t.deleted for t in counted),
        )
