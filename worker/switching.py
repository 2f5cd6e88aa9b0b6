"""`python -m worker switch-model`: start, follow, show and cancel a tenant's model switch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from db import runs, staging
from db.sql import tenant_scope, unscoped
from tasks import runtime
from tasks.retry import EmbedderError
from tasks.runtime import Runtime
from tasks.switch import cancel_switch, plan_switch


@dataclass(frozen=True, slots=True)
class SwitchState:
    tenant_id: str
    model: str
    from_model: str
    state: str  # queued, staging, stalled (failures), swapping
    staged: int
    published: int
    failed: int
    failures: list[dict[str, str]]
    run_id: str | None


def switch_report(rt: Runtime) -> list[SwitchState]:
    """Every switch under way: how far its staging is, and what failed."""
    with unscoped(rt.engine) as conn:
        switches = staging.list_switches(conn)
    report = []
    for switch in switches:
        with tenant_scope(rt.engine, switch.tenant_id) as conn:
            count = staging.staged_count(conn, switch.tenant_id, switch.model)
            run = runs.get_run(conn, switch.run_id) if switch.run_id else None
            failed = staging.failed_items(conn, run.id) if run and run.failed else []
        if run is None:
            state = "queued"
        elif run.finished_at is None:
            state = "staging"
        else:
            state = "stalled" if run.failed else "swapping"
        report.append(
            SwitchState(
                switch.tenant_id, switch.model, switch.from_model, state, count.staged,
                count.published, run.failed if run else 0,
                [{"skill_id": skill, "reason": reason} for skill, reason in failed],
                switch.run_id,
            )
        )  # fmt: skip
    return report


def describe_switch(row: SwitchState) -> list[str]:
    lines = [
        f"Switch of {row.tenant_id} from {row.from_model} to {row.model}: {row.state},"
        f" {row.staged}/{row.published} staged, {row.failed} failures"
    ]
    lines += [f"  failed: {f['skill_id']}: {f['reason']}" for f in row.failures]
    if row.state == "stalled":
        lines.append(
            f"  retry: python -m worker switch-model --tenant {row.tenant_id} --model {row.model}"
            f"   cancel: python -m worker switch-model --cancel --tenant {row.tenant_id}"
        )
    return lines


def switches_document(rt: Runtime) -> list[dict[str, Any]]:
    return [asdict(row) for row in switch_report(rt)]


def switch_command(settings: Any, args: argparse.Namespace) -> int:
    rt = runtime.install(settings)
    if args.status:
        report = switch_report(rt)
        if args.json:
            print(json.dumps([asdict(row) for row in report], indent=2))
        for row in [] if args.json else report:
            print("\n".join(describe_switch(row)))
        if not report and not args.json:
            print("No model switch is under way.")
        return 0
    if args.cancel:
        tenant = args.tenant or settings.default_tenant_id
        cancelled = cancel_switch(rt, tenant)
        if cancelled is None:
            print(f"error: no model switch is under way for tenant {tenant!r}", file=sys.stderr)
            return 1
        print(f"Cancelled the switch of {tenant} to {cancelled.model}: staged vectors dropped,"
              " nothing live changed.")  # fmt: skip
        return 0
    if not args.model:
        print("error: name the new model: switch-model --model M [--tenant T]", file=sys.stderr)
        return 2
    return _start(rt, args)


def _start(rt: Runtime, args: argparse.Namespace) -> int:
    from worker.celery_app import app

    try:
        # The worker checks again when it starts the switch; this answers at once.
        plan = plan_switch(rt, args.model, args.tenant)
    except EmbedderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = app.send_task(
        "tasks.switch_model", kwargs={"model": args.model, "tenant_id": args.tenant}
    )
    tenants = [tenant for tenant, _ in plan.tenants]
    print(f"Switch of {', '.join(tenants)} to {plan.model} ({plan.dimensions} dimensions) queued")
    if not args.wait:
        return 0
    outcome = result.get(timeout=args.timeout, propagate=False)
    if result.failed():
        print(f"error: {outcome}", file=sys.stderr)
        return 1
    return _follow(rt, tenants, args.timeout)


def _follow(rt: Runtime, tenants: list[str], timeout: float | None) -> int:
    """Print progress until every tenant's switch has swapped; 1 if one stalls."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    while True:
        report = {row.tenant_id: row for row in switch_report(rt)}
        rows = [report[t] for t in tenants if t in report]
        line = "; ".join(f"{r.tenant_id} {r.state} {r.staged}/{r.published}" for r in rows)
        if line and line != last:
            print(line, flush=True)
            last = line
        if not rows:
            print("Done: every switch has swapped.")
            return 0
        if any(r.state == "stalled" for r in rows):
            for row in rows:
                print("\n".join(describe_switch(row)), file=sys.stderr)
            return 1
        if deadline is not None and time.monotonic() > deadline:
            print(f"error: the switch did not finish in {timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
