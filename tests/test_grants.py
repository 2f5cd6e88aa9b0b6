"""The worker's grants come from the code: a role holding exactly what `python -m worker grants`
prints, and no more, runs every task and command."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.fake_ollama import FakeOllama
from tasks import enqueue_embed_skill
from tests.backfills import published_catalog, summaries
from tests.databases import OWNER, TENANT_A, Database
from tests.processes import celery, start_worker
from tests.waiting import wait_until

ROLE = "embedder_granted"
NEW = "embeddinggemma"  # a second 768-dimension model: the switch's
GRANT = re.compile(r"GRANT (.+) ON TABLE (\w+) TO (\S+);")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture
def granted_url(db: Database) -> Iterator[str]:
    """A login role that holds nothing on the database's tables until it is granted."""
    db.server.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD 'granted' NOSUPERUSER NOBYPASSRLS")
    try:
        yield db.server.url(ROLE, "granted", db.name)
    finally:
        db.dispose()
        db.server.psql(f"DROP OWNED BY {ROLE}", database=db.name)
        db.server.psql(f"DROP ROLE {ROLE}")


def held(db: Database, role: str) -> set[tuple[str, str]]:
    rows = db.rows(
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
        " WHERE grantee = :role",
        role=role,
    )
    return {(str(row.table_name), str(row.privilege_type)) for row in rows}


@pytest.mark.slow  # a worker of its own
def test_a_role_with_exactly_the_printed_grants_runs_every_task_and_command(
    db: Database,
    granted_url: str,
    embedder_env: dict[str, str],
    ollama: FakeOllama,
    tmp_path: Path,
) -> None:
    ollama.models = {"nomic-embed-text", NEW}
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 6)

    printed = cli({"PATH": embedder_env["PATH"]}, "grants", ROLE)  # no settings needed
    assert printed.returncode == 0, printed.stderr
    statements = printed.stdout.strip().splitlines()
    assert all(GRANT.fullmatch(line) for line in statements), printed.stdout
    expected = {
        (table, privilege.strip())
        for privileges, table, _ in (GRANT.fullmatch(line).groups() for line in statements)  # type: ignore[union-attr]
        for privilege in privileges.split(",")
    }
    assert ("skills", "SELECT") in expected
    assert ("skills", "UPDATE") not in expected  # the app's tables: read-only where only read
    assert ("tenants", "INSERT") not in expected

    owner = {**embedder_env, "DATABASE_URL": db.url(OWNER)}
    missing = cli(owner, "migrate", "--grant", "nobody_here")
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        'error: cannot grant to nobody_here: role "nobody_here" does not exist (create the role'
        " first, and run migrate as the tables' owner)"
    ]
    migrated = cli(owner, "migrate", "--grant", ROLE)
    assert migrated.returncode == 0, migrated.stderr
    assert "Granted embedder_granted what the worker needs on " in migrated.stdout
    assert held(db, ROLE) == expected  # exactly what was printed, no more

    env = {**embedder_env, "DATABASE_URL": granted_url}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        # A backfill (its fan-out, batches and summary), then an app job for an edited skill.
        backfill = cli(env, "backfill", "--wait", "--timeout", "60")
        assert backfill.returncode == 0, backfill.stdout + backfill.stderr
        assert summaries(worker.log()) == [(6, 6, 0)]
        db.edit_skill(skills[0], description="Edited after the backfill")
        assert enqueue_embed_skill(skills[0], TENANT_A, broker_url=env["REDIS_URL"])
        wait_until(lambda: "Embedded: Catalog skill 0000" in worker.log().split("Done.")[-1],
                   what="the app job")  # fmt: skip
        # The periodic reconcile (beat's, and the worker's catch-up).
        called = subprocess.run(celery("call", "tasks.reconcile"), env=env, capture_output=True,
                                text=True)  # fmt: skip
        assert called.returncode == 0, called.stderr
        wait_until(lambda: f"tasks.reconcile[{called.stdout.strip()}] succeeded" in worker.log(),
                   what="the reconcile")  # fmt: skip
        # A model switch, staged and swapped.
        switched = cli(env, "switch-model", "--tenant", TENANT_A, "--model", NEW, "--wait",
                       "--timeout", "60")  # fmt: skip
        assert switched.returncode == 0, switched.stdout + switched.stderr
        wait_until(lambda: "Swapped tenant " in worker.log(), what="the swap")
        for command in (
            ["status"],
            ["status", "--json"],
            ["status", "--failures"],
            ["switch-model", "--status"],
            ["search", "Catalog skill 0003"],
            ["health", "--ready"],
        ):
            result = cli(env, *command)
            assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        log = worker.log()
        assert "permission denied" not in log
        assert "Traceback" not in log
    finally:
        worker.stop()
