"""`python -m worker migrate`: Alembic migrations with a version table of the worker's own."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

# Its own name, so it never collides with a version table the app (or another tool) keeps.
VERSION_TABLE = "embedder_alembic_version"
MIGRATIONS = Path(__file__).parent / "migrations"


def _config(engine: Engine, dimensions: int) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["dimensions"] = dimensions
    return config


def upgrade(engine: Engine, *, dimensions: int = 768, revision: str = "head") -> None:
    """Bring the database to `revision`; a no-op when it is already there."""
    config = _config(engine, dimensions)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()
