"""What `python -m worker status` and `backfill --wait` show: coverage and run progress."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from db import catalog, failures, runs
from db.sql import per_tenant, unscoped
from tasks import refusals
from tasks.embedding import tenant_config
from tasks.progress import left_catalog, summary
from tasks.runtime import Runtime

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import Connection


@dataclass(frozen=True, slots=True)
class TenantCoverage:
    coverage: catalog.Coverage
    enabled: bool
    model: str


def coverage_report(rt: Runtime) -> list[TenantCoverage]:
    with unscoped(rt.engine) as conn:
        tenants = catalog.list_active_tenants(conn)

    def count(conn: Connection, tenant: str) -> TenantCoverage:
        config = tenant_config(rt, conn, tenant)
        dimensions = config.dimensions or rt.settings.embedding_dimensions
        cover = catalog.coverage(conn, tenant, model=config.model, dimensions=dimensions)
        return TenantCoverage(cover, config.enabled, config.model)

    return list(per_tenant(rt.engine, tenants, count).values())


def coverage_table(report: list[TenantCoverage]) -> Table:
    table = Table(title="Embedding coverage", title_justify="left")
    for column in ("tenant", "semantic search", "model", "published", "embedded", "stale"):
        table.add_column(column, justify="left" if column in {"tenant", "model"} else "right")
    table.add_column("missing", justify="right")
    for row in report:
        c = row.coverage
        table.add_row(
            c.tenant_id,
            "on" if row.enabled else "off",
            row.model,
            str(c.published),
            str(c.embedded),
            str(c.stale),
            str(c.missing),
        )
    return table


def describe_run(state: runs.RunState | None) -> str:
    if state is None:
        return "No backfill has run yet."
    if state.kind == runs.SWITCH:
        return describe_staging_run(state)
    if state.finished_at is not None:
        left = f" {left_catalog(state)}" if left_catalog(state) else ""
        return (
            f"Last backfill {state.id} finished {state.finished_at:%Y-%m-%d %H:%M:%S}:"
            f" {summary(state)}{left}"
        )
    return (
        f"Backfill {state.id} running since {state.started_at:%Y-%m-%d %H:%M:%S}:"
        f" {state.done}/{state.total} done ({state.embedded} embedded, {state.unchanged}"
        f" unchanged, {state.failed} failed)"
    )


def describe_staging_run(state: runs.RunState) -> str:
    """A model switch's staging run: its vectors went aside, not into live search."""
    what = f"staging a switch to {state.model} ({state.tenant_id}), run {state.id}"
    if state.finished_at is not None:
        return f"Last run: {what}, finished {state.finished_at:%Y-%m-%d %H:%M:%S}: {summary(state)}"
    return (
        f"Running: {what}, since {state.started_at:%Y-%m-%d %H:%M:%S}:"
        f" {state.done}/{state.total} done ({state.embedded} staged, {state.unchanged}"
        f" already staged, {state.failed} failed)"
    )


def describe_oldest_pending(oldest: failures.OldestPending | None) -> str:
    if oldest is None:
        return "No item is pending."
    return (
        f"Oldest pending item: {oldest.skill_id} of backfill {oldest.run_id},"
        f" waiting {format_age(oldest.age_seconds)}"
    )


def describe_kept(kept: tuple[int, int], days: float) -> str:
    runs_kept, items = kept
    return (
        f"Kept: {runs_kept} {'run' if runs_kept == 1 else 'runs'}, {items} items of skills they"
        f" sent (finished runs go after RUN_RETENTION_DAYS={days:g}; the newest stays)"
    )


def format_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def print_status(rt: Runtime, console: Console) -> None:
    from worker.switching import describe_switch, switch_report

    console.print(coverage_table(coverage_report(rt)))
    with unscoped(rt.engine) as conn:
        # One line however narrow the terminal: operators grep it.
        console.print(describe_run(runs.latest_run(conn)), soft_wrap=True)
        console.print(describe_oldest_pending(failures.oldest_pending_item(conn)))
        console.print(describe_kept(runs.kept(conn), rt.settings.run_retention_days))
    for row in switch_report(rt):
        console.print("\n".join(describe_switch(row)), highlight=False, markup=False)
    console.print(describe_refusals(refusals.counts(rt.redis)), highlight=False, markup=False)


def describe_refusals(counts: dict[str, int]) -> str:
    """Messages producers sent that the worker refused, per reason: a broken producer shows."""
    if not counts:
        return "No message was refused."
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts.items())
    return (
        f"Refused messages: {sum(counts.values())} ({reasons}); the latest are in Redis list"
        f" {refusals.SET_ASIDE}"
    )


def status_document(rt: Runtime) -> dict[str, Any]:
    """`status --json`: coverage per tenant, the newest run, the oldest pending item, and the
    model switches under way."""
    from worker.switching import switches_document

    report = coverage_report(rt)
    with unscoped(rt.engine) as conn:
        run = runs.latest_run(conn)
        pending = runs.pending_count(conn, run.id) if run is not None else 0
        oldest = failures.oldest_pending_item(conn)
        runs_kept, items_kept = runs.kept(conn)
    return {
        "tenants": [
            {
                "tenant_id": row.coverage.tenant_id,
                "semantic_search": row.enabled,
                "model": row.model,
                "published": row.coverage.published,
                "embedded": row.coverage.embedded,
                "stale": row.coverage.stale,
                "missing": row.coverage.missing,
            }
            for row in report
        ],
        "run": None if run is None else run_document(run, pending),
        "oldest_pending": None
        if oldest is None
        else {
            "run_id": oldest.run_id,
            "skill_id": oldest.skill_id,
            "waiting_since": oldest.waiting_since.isoformat(),
            "age_seconds": round(oldest.age_seconds, 3),
        },
        "switches": switches_document(rt),
        "kept": {
            "runs": runs_kept,
            "items": items_kept,
            "retention_days": rt.settings.run_retention_days,
        },
        "refused": refusals.counts(rt.redis),  # reason -> messages refused (tasks.refusals)
    }


def run_document(run: runs.RunState, pending: int) -> dict[str, Any]:
    return {
        "id": run.id,
        "kind": run.kind,  # "backfill", or "switch": a model switch's staging run
        "model": run.model,  # a switch's new model; None for a backfill
        "tenant_id": run.tenant_id,
        "force": run.force,
        "total": run.total,
        "done": run.done,
        "pending": pending,
        "embedded": run.embedded,
        "unchanged": run.unchanged,
        "failed": run.failed,
        "skipped": run.skipped,
        "left_catalog": {"unpublished": run.unpublished, "deleted": run.deleted},
        "started_at": run.started_at.isoformat(),
        "finished_at": None if run.finished_at is None else run.finished_at.isoformat(),
        "summary": summary(run) if run.finished_at is not None else None,
    }


class BackfillFailed(Exception):
    """The backfill task itself failed (e.g. its preflight refused); the message says why."""


def follow_run(
    rt: Runtime, app: Celery, run_id: str, console: Console, *, timeout: float | None = None
) -> runs.RunState:
    """Show a live progress bar until the run's summary; raise BackfillFailed if it is refused."""
    deadline = None if timeout is None else time.monotonic() + timeout
    result = app.AsyncResult(run_id)
    with Progress(
        TextColumn("[bold]Backfill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("backfill", total=None, detail="waiting for a worker")
        while True:
            with unscoped(rt.engine) as conn:
                state = runs.get_run(conn, run_id)
            if state is None and result.state == "FAILURE":
                raise BackfillFailed(str(result.result))
            if state is None and result.state == "SUCCESS" and isinstance(result.result, dict):
                joined = str(result.result.get("run_id", run_id))
                if joined != run_id:  # it joined an open run: follow that one to its summary
                    console.print(f"Joined backfill {joined}, still running")
                    run_id = joined
                    continue
            if state is not None:
                progress.update(
                    bar,
                    total=state.total if state.fanned_out else None,
                    completed=state.done,
                    detail=f"{state.failed} failed" if state.failed else "",
                )
                if state.finished_at is not None:
                    return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"backfill {run_id} did not finish in {timeout:.0f} s")
            time.sleep(0.2)
