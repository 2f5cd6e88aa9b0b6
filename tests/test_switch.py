"""`python -m worker switch-model` and `search`: a tenant's model changes with no mixed moment."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from devstack.fake_ollama import FakeOllama, vector_for
from tasks import enqueue_embed_skill
from tasks.text import skill_text
from tests.databases import APP_ROLE, TENANT_A, Database
from tests.processes import Process, start_worker
from tests.test_backfill import call_backfill, published_catalog, summaries
from tests.waiting import wait_until

NEW = "embeddinggemma"  # 768 dimensions, like the app's column
STAGED = re.compile(r"Done\. Staged (\d+)/(\d+) skills for (\S+)\. (\d+) failures\.")
SWAPPED = "Swapped tenant "


@pytest.fixture(autouse=True)
def models(ollama: FakeOllama) -> None:
    ollama.models = {"nomic-embed-text", NEW, "mxbai-embed-large"}
    ollama.model_dimensions = {"mxbai-embed-large": 1024}


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def staged_summaries(log: str) -> list[tuple[int, int, str, int]]:
    return [(int(a), int(b), m, int(c)) for a, b, m, c in STAGED.findall(log)]


def backfilled(db: Database, worker: Process, env: dict[str, str], count: int) -> list[str]:
    """A tenant whose `count` skills are embedded with nomic-embed-text."""
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, count)
    call_backfill(env)
    wait_until(lambda: summaries(worker.log()), timeout=120, what="the backfill's summary")
    return skills


def live_models(db: Database) -> dict[str, int]:
    rows = db.rows("SELECT model_name, count(*) AS n FROM skill_embeddings GROUP BY 1")
    return {str(r.model_name): int(r.n) for r in rows}


def tenant_model(db: Database) -> tuple[str, int]:
    row = db.rows(
        "SELECT ollama_model, embedding_dimensions FROM site_settings WHERE tenant_id = :t",
        t=TENANT_A,
    )[0]
    return str(row.ollama_model), int(row.embedding_dimensions)


def assert_new_vectors_of_current_text(db: Database) -> None:
    rows = db.rows(
        "SELECT s.name, s.description, e.embedding::text AS embedding, e.model_name"
        " FROM skill_embeddings e JOIN skills s ON s.id = e.skill_id"
    )
    for row in rows:
        assert row.model_name == NEW
        stored = [float(x) for x in str(row.embedding).strip("[]").split(",")]
        expected = vector_for(skill_text(row.name, row.description), 768, NEW)
        assert stored == pytest.approx(expected, abs=1e-6), row.name


def test_a_switch_stages_then_swaps_and_search_finds_the_same_text_first(
    db: Database, worker: Process, embedder_env: dict[str, str]
) -> None:
    skills = backfilled(db, worker, embedder_env, 20)

    result = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", NEW, "--wait")

    assert result.returncode == 0, result.stderr
    wait_until(lambda: SWAPPED in worker.log(), what="the swap line")
    assert staged_summaries(worker.log()) == [(20, 20, NEW, 0)]
    assert worker.log().count(SWAPPED) == 1
    assert live_models(db) == {NEW: 20}
    assert tenant_model(db) == (NEW, 768)
    assert db.scalar("SELECT count(*) FROM staged_embeddings") == 0
    assert_new_vectors_of_current_text(db)
    assert len(re.findall(r"\[\d+/20\] Embedded: ", worker.log())) >= 20

    found = cli(embedder_env, "search", "Catalog skill 0007 Does useful thing number 7")

    assert found.returncode == 0, found.stderr
    first = found.stdout.splitlines()[1].split()
    assert first == ["Catalog", "skill", "0007", "0.0000", NEW]
    assert len(found.stdout.splitlines()) == 6
    assert len(skills) == 20
