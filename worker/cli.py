"""`python -m worker ...`: migrate, grants, status, backfill, health, switch-model, search."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from worker.settings import ConfigError, Settings

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy import Engine


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from db import migrate
    from db.sql import make_engine

    engine = make_engine(settings.database_url)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine, dimensions=settings.embedding_dimensions)
        after = migrate.current_revision(engine)
        if before == after:
            print(f"Database is up to date ({after}) at {settings.masked_database_url}")
        else:
            print(f"Migrated {before or 'empty'} -> {after} at {settings.masked_database_url}")
        if args.grant is not None:
            return _apply_grants(engine, args.grant)
    finally:
        engine.dispose()
    return 0


def _apply_grants(engine: Engine, role: str) -> int:
    from sqlalchemy.exc import ProgrammingError

    from db.grants import WORKER_PRIVILEGES, apply_grants

    try:
        with engine.begin() as connection:
            apply_grants(connection, role)
    except ProgrammingError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        print(f"error: cannot grant to {role}: {reason} (create the role first, and run"
              " migrate as the tables' owner)", file=sys.stderr)  # fmt: skip
        return 1
    print(f"Granted {role} what the worker needs on {len(WORKER_PRIVILEGES)} tables")
    return 0


def _grants(args: argparse.Namespace) -> int:
    from db.grants import grant_statements

    print("\n".join(grant_statements(args.role)))
    return 0


def _console() -> Console:
    from rich.console import Console

    # In a log (not a terminal) keep table rows whole instead of cutting them to 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160)


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from tasks import runtime

    rt = runtime.install(settings)
    if args.failures:
        from worker.failures_report import failure_report, failures_document, print_failures

        report = failure_report(rt)
        if args.json:
            print(json.dumps(failures_document(report), indent=2))
        else:
            print_failures(report, _console())
        return 0
    from worker.operations import print_status, status_document

    if args.json:
        print(json.dumps(status_document(rt), indent=2))
    else:
        print_status(rt, _console())
    return 0


def _health(settings: Settings, args: argparse.Namespace) -> int:
    from worker.health import check_heartbeat, check_readiness

    checks = [check_heartbeat(settings, args.hostname)]
    if args.ready:
        checks += check_readiness(settings)
    failing = [check for check in checks if check.problem is not None]
    for check in failing or checks:
        print(check.line, file=sys.stderr if failing else sys.stdout)
    return 1 if failing else 0


def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    from tasks import runtime
    from tasks.progress import left_catalog, summary
    from worker.celery_app import app
    from worker.operations import BackfillFailed, follow_run

    runtime.install(settings)
    result = app.send_task("tasks.backfill", kwargs={"tenant_id": args.tenant, "force": args.force})
    print(f"Backfill {result.id} queued")
    if not args.wait:
        return 0
    console = _console()
    try:
        state = follow_run(runtime.current(), app, result.id, console, timeout=args.timeout)
    except BackfillFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(state))
    if (left := left_catalog(state)) is not None:
        print(left)
    return 0 if state.failed == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description="everyskill-embedder: operate the embedding worker."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate", help="create the worker's tables (and the app's, where missing)"
    )
    migrate.add_argument(
        "--grant", metavar="ROLE", type=_role, help="then grant ROLE what the worker needs"
    )
    grants = commands.add_parser(
        "grants", help="print the GRANT statements that give a role what the worker needs"
    )
    grants.add_argument("role", type=_role, help="the role the worker logs in as")
    status = commands.add_parser(
        "status", help="per tenant: published, embedded, stale, missing; the run"
    )
    status.add_argument(
        "--failures", action="store_true", help="failed skills: the last run's, and outside runs"
    )
    status.add_argument("--json", action="store_true", help="one JSON document, stable keys")
    health = commands.add_parser(
        "health", help="exit 0 when this host's worker consumes (liveness)"
    )
    health.add_argument(
        "--ready", action="store_true", help="also Redis, PostgreSQL and each Ollama with its model"
    )
    health.add_argument(
        "--hostname", help="the worker's node name (default: the one that beat last on this host)"
    )
    backfill = commands.add_parser("backfill", help="queue tasks.backfill (like `celery call`)")
    backfill.add_argument("--tenant", help="only this tenant (default: every active tenant)")
    backfill.add_argument("--force", action="store_true", help="re-embed even current skills")
    backfill.add_argument("--wait", action="store_true", help="show progress until the summary")
    backfill.add_argument("--timeout", type=float, default=None, help="give up waiting after N s")
    switch = commands.add_parser(
        "switch-model", help="re-embed tenants with another model, swapped in at once"
    )
    switch.add_argument("--model", help="the new model, pulled on the tenant's Ollama")
    switch.add_argument("--tenant", help="only this tenant (default: every active one, in turn)")
    switch.add_argument("--status", action="store_true", help="show the switches under way")
    switch.add_argument("--cancel", action="store_true", help="drop the tenant's staged vectors")
    switch.add_argument("--json", action="store_true", help="with --status: one JSON document")
    switch.add_argument("--wait", action="store_true", help="follow until the swap")
    switch.add_argument("--timeout", type=float, default=None, help="give up waiting after N s")
    search = commands.add_parser("search", help="the nearest skills to a text (cosine distance)")
    search.add_argument("text", help="what to search for")
    search.add_argument("--tenant", help="the tenant (default: the default tenant)")
    search.add_argument("--limit", type=int, default=5, help="how many skills (default 5)")
    return parser


def _role(value: str) -> str:
    from db.grants import check_role

    try:
        return check_role(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _switch_model(settings: Settings, args: argparse.Namespace) -> int:
    from worker.switching import switch_command

    return switch_command(settings, args)


def _search(settings: Settings, args: argparse.Namespace) -> int:
    from worker.search import search_command

    return search_command(settings, args)


HANDLERS = {
    "migrate": _migrate,
    "status": _status,
    "backfill": _backfill,
    "health": _health,
    "switch-model": _switch_model,
    "search": _search,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "grants":  # needs no settings: an operator runs it before any exist
        return _grants(args)
    try:
        settings = Settings.load()
        return HANDLERS[args.command](settings, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from worker.errors import describe_operational_error

        message = describe_operational_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
