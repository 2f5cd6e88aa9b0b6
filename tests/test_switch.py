"""`python -m worker switch-model` and `search`: a tenant's model changes with no mixed moment."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa

from db.catalog import skill_text
from devstack.fake_ollama import FakeOllama, vector_for
from tasks import enqueue_embed_skill
from tests.backfills import call_backfill, published_catalog, summaries
from tests.databases import APP_ROLE, TENANT_A, Database
from tests.processes import Process
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
    status = cli(embedder_env, "status")
    assert f"Last run: staging a switch to {NEW} ({TENANT_A}), run " in status.stdout
    assert f": Done. Staged 20/20 skills for {NEW}. 0 failures." in status.stdout
    assert "Last backfill" not in status.stdout
    run = json.loads(cli(embedder_env, "status", "--json").stdout)["run"]
    assert (run["kind"], run["model"], run["summary"]) == (
        "switch", NEW, f"Done. Staged 20/20 skills for {NEW}. 0 failures.",
    )  # fmt: skip

    found = cli(embedder_env, "search", "Catalog skill 0007 Does useful thing number 7")

    assert found.returncode == 0, found.stderr
    first = found.stdout.splitlines()[1].split()
    assert first == ["Catalog", "skill", "0007", "0.0000", NEW]
    assert len(found.stdout.splitlines()) == 6
    assert len(skills) == 20


def snapshot(db: Database) -> tuple[object, ...]:
    """What a switch must leave alone when refused or cancelled."""
    return (
        [tuple(row) for row in db.embedding_rows()],
        tenant_model(db),
        db.scalar("SELECT count(*) FROM embedding_switches"),
        db.scalar("SELECT count(*) FROM staged_embeddings"),
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("all-minilm", "model 'all-minilm' is not pulled on Ollama at "),
        (
            "mxbai-embed-large",
            "model 'mxbai-embed-large' makes 1024-dimension vectors but the app's"
            " skill_embeddings.embedding is vector(768): the app's schema must change first",
        ),
    ],
    ids=["not-pulled", "wrong-size"],
)
def test_a_switch_is_refused_in_one_line_before_any_write(
    db: Database, worker: Process, embedder_env: dict[str, str], model: str, expected: str
) -> None:
    backfilled(db, worker, embedder_env, 3)
    runs_before = db.scalar("SELECT count(*) FROM embedding_runs")
    before = snapshot(db)

    result = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", model)

    assert result.returncode == 1
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(db) == before
    assert db.scalar("SELECT count(*) FROM embedding_runs") == runs_before
    assert "Traceback" not in worker.log()


def test_cancel_mid_staging_leaves_live_rows_and_settings_as_they_were(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    backfilled(db, worker, embedder_env, 40)
    before = snapshot(db)
    gate = ollama.hold()
    try:
        started = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", NEW)
        assert started.returncode == 0, started.stderr
        gate.wait_held()
        again = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", NEW)
        shown = cli(embedder_env, "status", "--json")
        shown_text = cli(embedder_env, "status")
        listed = cli(embedder_env, "switch-model", "--status")
        cancelled = cli(embedder_env, "switch-model", "--cancel", "--tenant", TENANT_A)
    finally:
        gate.release()

    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"error: Switch refused: tenant {TENANT_A!r} is already switching to {NEW}: wait for it,"
        f" or cancel it (python -m worker switch-model --cancel --tenant {TENANT_A})"
    ]
    document = json.loads(shown.stdout)
    [switch] = document["switches"]
    # The newest run is the switch's staging, and says so.
    run = document["run"]
    assert (run["kind"], run["model"], run["tenant_id"], run["total"]) == (
        "switch", NEW, TENANT_A, 40,
    )  # fmt: skip
    assert (run["summary"], run["finished_at"]) == (None, None)
    assert f"Running: staging a switch to {NEW} ({TENANT_A}), run {run['id']}, since " in (
        shown_text.stdout
    )
    assert "Backfill " not in shown_text.stdout
    assert (switch["model"], switch["state"], switch["published"], switch["failed"]) == (
        NEW, "staging", 40, 0,
    )  # fmt: skip
    assert f"Switch of {TENANT_A} from nomic-embed-text to {NEW}: staging" in listed.stdout
    assert cancelled.returncode == 0, cancelled.stderr
    # The batch that was held ends too, and writes nothing.
    wait_until(lambda: db.scalar("SELECT count(*) FROM embedding_run_items WHERE outcome IS NULL")
               == 0, what="every item of the cancelled run to end")  # fmt: skip
    wait_until(lambda: ollama.in_flight == 0, what="the held request to end")
    assert snapshot(db)[:2] == before[:2]
    assert db.scalar("SELECT count(*) FROM embedding_switches") == 0
    wait_until(lambda: db.scalar("SELECT count(*) FROM staged_embeddings") == 0,
               what="no staged rows")  # fmt: skip
    assert SWAPPED not in worker.log()
    assert "No model switch is under way." in cli(embedder_env, "switch-model", "--status").stdout


class Sampler:
    """What the app's search would read: the tenant's models, from the app's role under RLS."""

    def __init__(self, db: Database) -> None:
        self.engine = db.engine(APP_ROLE)
        self.samples: list[tuple[str, dict[str, int]]] = []

    def sample(self, phase: str) -> dict[str, int]:
        with self.engine.begin() as connection:
            connection.execute(
                sa.text("SELECT set_config('app.current_tenant_id', :t, true)"), {"t": TENANT_A}
            )
            rows = connection.execute(
                sa.text("SELECT model_name, count(*) FROM skill_embeddings GROUP BY 1")
            )
            seen = {str(model): int(count) for model, count in rows}
        self.samples.append((phase, seen))
        return seen

    def phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for phase, _ in self.samples:
            counts[phase] = counts.get(phase, 0) + 1
        return counts


def swap_waits_on_lock(db: Database) -> bool:
    return bool(
        db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE 'DELETE FROM staged_embeddings WHERE tenant_id%'"
        )
    )


def test_readers_see_exactly_one_model_through_staging_and_the_swap(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    skills = sorted(backfilled(db, worker, embedder_env, 200))
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    sampler = Sampler(db)
    gate = ollama.hold(match=names[skills[100]])
    admin = db.admin.connect()
    try:
        started = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", NEW)
        assert started.returncode == 0, started.stderr
        gate.wait_held()
        # Staging: half the catalog staged, the live rows untouched.
        for _ in range(30):
            assert sampler.sample("staging") == {"nomic-embed-text": 200}
        # The swap, held from inside: a staged row it must delete is locked here, so its
        # transaction has rewritten every live row and waits, uncommitted, while we read.
        transaction = admin.begin()
        admin.execute(
            sa.text("SELECT 1 FROM staged_embeddings WHERE skill_id = :s FOR UPDATE"),
            {"s": skills[0]},
        )
        gate.release()
        wait_until(lambda: swap_waits_on_lock(db), timeout=120, what="the swap to reach the lock")
        for _ in range(30):
            assert sampler.sample("swap") == {"nomic-embed-text": 200}
        transaction.rollback()
        wait_until(lambda: SWAPPED in worker.log(), what="the swap's line")
        for _ in range(5):
            assert sampler.sample("after") == {NEW: 200}
    finally:
        gate.release()
        admin.close()

    assert all(len(seen) == 1 for _, seen in sampler.samples)
    assert sampler.phases() == {"staging": 30, "swap": 30, "after": 5}
    assert tenant_model(db) == (NEW, 768)
    assert live_models(db) == {NEW: 200}
    assert staged_summaries(worker.log()) == [(200, 200, NEW, 0)]
    assert worker.log().count(SWAPPED) == 1


def test_skills_edited_published_and_unpublished_during_staging_end_current(
    db: Database, worker: Process, embedder_env: dict[str, str], ollama: FakeOllama,
    redis_url: str,
) -> None:  # fmt: skip
    skills = sorted(backfilled(db, worker, embedder_env, 200))
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    gate = ollama.hold(match=names[skills[100]])
    try:
        started = cli(embedder_env, "switch-model", "--tenant", TENANT_A, "--model", NEW)
        assert started.returncode == 0, started.stderr
        gate.wait_held()
        db.edit_skill(skills[0], description="Edited after it was staged")
        db.edit_skill(skills[199], description="Edited before it was staged")
        db.edit_skill(skills[1], status="rejected")
        fresh = db.add_skill(TENANT_A, "Published during staging", "Brand new")
        for skill in (skills[0], skills[199], skills[1], fresh):
            assert enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
    finally:
        gate.release()

    wait_until(lambda: SWAPPED in worker.log(), timeout=120, what="the swap")
    assert tenant_model(db) == (NEW, 768)
    ids = {str(r.skill_id) for r in db.rows("SELECT skill_id FROM skill_embeddings")}
    assert ids == (set(skills) - {skills[1]}) | {fresh}
    assert_new_vectors_of_current_text(db)
    assert worker.log().count(SWAPPED) == 1
    # One summary, like a backfill's: X + Z = Y, the catalog at the switch's end (199 of the
    # 200 still published, and the one published during it); the one that left, on its own line.
    assert staged_summaries(worker.log()) == [(200, 200, NEW, 0)]
    assert "1 skill left the catalog during the run (1 unpublished, 0 deleted)." in worker.log()
