"""`python -m worker status --failures`: the skills that failed, by name, and why."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from db import failures, runs
from db.failures import Failure
from db.sql import tenant_scope, unscoped
from tasks.runtime import Runtime


@dataclass(frozen=True, slots=True)
class FailureReport:
    run: runs.RunState | None
    in_run: list[Failure]
    outside_runs: list[Failure]
    names: dict[str, str]  # skill_id -> name, for the skills row level security let us read


def failure_report(rt: Runtime) -> FailureReport:
    with unscoped(rt.engine) as conn:
        run = runs.latest_run(conn)
        in_run = failures.run_failures(conn, run.id) if run is not None else []
        outside = failures.failures_outside_runs(conn)
    by_tenant: dict[str, list[str]] = defaultdict(list)
    for failure in (*in_run, *outside):
        if failure.tenant_id is not None:
            by_tenant[failure.tenant_id].append(failure.skill_id)
    names: dict[str, str] = {}
    # Skills are behind row level security: their names are read tenant by tenant.
    for tenant, skill_ids in by_tenant.items():
        with tenant_scope(rt.engine, tenant) as conn:
            names.update(failures.skill_names(conn, skill_ids))
    return FailureReport(run, in_run, outside, names)


def _row(failure: Failure, names: dict[str, str]) -> dict[str, Any]:
    return {
        "skill_id": failure.skill_id,
        "tenant_id": failure.tenant_id,
        "name": names.get(failure.skill_id),
        "reason": failure.reason,
        "attempts": failure.attempts,
        "failed_at": None if failure.failed_at is None else failure.failed_at.isoformat(),
    }


def failures_document(report: FailureReport) -> dict[str, Any]:
    """`status --failures --json`: stable keys, newest failure first in each list."""
    return {
        "run": None
        if report.run is None
        else {
            "id": report.run.id,
            "total": report.run.total,
            "failed": report.run.failed,
            "finished_at": None
            if report.run.finished_at is None
            else report.run.finished_at.isoformat(),
            "failures": [_row(f, report.names) for f in report.in_run],
        },
        "outside_runs": [_row(f, report.names) for f in report.outside_runs],
    }


def _table(title: str, rows: list[Failure], names: dict[str, str]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("failed at", "tenant", "skill", "name", "attempts", "reason"):
        table.add_column(column, justify="right" if column == "attempts" else "left")
    for f in rows:
        table.add_row(
            "-" if f.failed_at is None else f"{f.failed_at:%Y-%m-%d %H:%M:%S}",
            f.tenant_id or "-",
            f.skill_id,
            names.get(f.skill_id, "-"),
            "-" if f.attempts is None else str(f.attempts),
            f.reason,
        )
    return table


def print_failures(report: FailureReport, console: Console) -> None:
    if report.run is None:
        console.print("No backfill has run yet.")
    elif not report.in_run:
        console.print(f"Backfill {report.run.id}: no failures.")
    else:
        console.print(_table(f"Failures of backfill {report.run.id}", report.in_run, report.names))
    if report.outside_runs:
        console.print(_table("Failures outside runs", report.outside_runs, report.names))
    else:
        console.print("No failures outside runs.")
