"""What tests arrange and read around a backfill: a catalog, the operator's command, the summary
line and the rows it leaves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

from tests.databases import TENANT_A, Database
from tests.processes import celery

SUMMARY = re.compile(r"Done\. Embedded (\d+)/(\d+) skills\. (\d+) failures\.")


def summaries(log: str) -> list[tuple[int, int, int]]:
    return [(int(a), int(b), int(c)) for a, b, c in SUMMARY.findall(log)]


def call_backfill(env: dict[str, str], *args: str) -> str:
    """`celery -A worker call tasks.backfill`, as an operator types it; returns the run id."""
    result = subprocess.run(
        celery("call", "tasks.backfill", *args), env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def embedded_ids(db: Database) -> set[str]:
    return {str(row.skill_id) for row in db.rows("SELECT skill_id FROM skill_embeddings")}


def published_catalog(db: Database, count: int, tenant: str = TENANT_A) -> list[str]:
    """`count` published skills of `tenant`, "Catalog skill 0000" on, in one statement."""
    return db.published_catalog(tenant, count)


def status_json(env: dict[str, str]) -> dict[str, Any]:
    """`python -m worker status --json`, as an operator runs it after a backfill."""
    result = subprocess.run(
        [sys.executable, "-m", "worker", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))
