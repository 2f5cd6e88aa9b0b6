"""`python -m worker ...`: migrate, status, backfill."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from worker.settings import ConfigError, Settings


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from db import migrate
    from db.session import make_engine

    engine = make_engine(settings.database_url)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine, dimensions=settings.embedding_dimensions)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        print(f"Database is up to date ({after}) at {settings.masked_database_url}")
    else:
        print(f"Migrated {before or 'empty'} -> {after} at {settings.masked_database_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description="everyskill-embedder: operate the embedding worker."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("migrate", help="create the worker's tables (and the app's, where missing)")
    return parser


HANDLERS = {"migrate": _migrate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
