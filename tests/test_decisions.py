"""The pure parts, without any server: what a skill needs, its text and hash, retries, URLs."""

from __future__ import annotations

import pytest

from db.catalog import SkillRecord, input_hash, skill_text
from tasks.embedding import Outcome, StoredEmbedding, TenantConfig, decide
from tasks.retry import ModelNotFound, OllamaUnavailable, backoff_seconds, should_retry
from worker.settings import mask_url, normalise_database_url

CONFIG = TenantConfig(True, "http://ollama:11434", "nomic-embed-text", 768)


def skill(status: str = "published", description: str | None = "Flag risky changes") -> SkillRecord:
    return SkillRecord("s1", "t1", "Review pull requests", description, status)


def stored_for(
    record: SkillRecord, model: str = "nomic-embed-text", dimensions: int = 768
) -> StoredEmbedding:
    text = skill_text(record.name, record.description)
    return StoredEmbedding(input_hash(text), model, dimensions)


# --- text and hash: the contract the app shares -----------------------------------------------


def test_the_embedded_text_is_name_space_description() -> None:
    assert skill_text("Review pull requests", "Flag risky changes") == (
        "Review pull requests Flag risky changes"
    )
    assert skill_text("Lonely name", None) == "Lonely name "


@pytest.mark.parametrize(
    ("text", "digest"),
    [
        (
            "Review pull requests Flag risky changes",
            "009a583bc88b8d5a9d2daa2755ede91c8dd2228f0f67858efc0b0b63b1f5a22f",
        ),
        (
            "Überprüfe Verträge 📄",
            "f5f28a5153b6f84d749580956bfe41108676e0c721aad7b72285cc690018005a",
        ),
    ],
)
def test_the_input_hash_is_the_sha256_hex_of_the_utf8_text(text: str, digest: str) -> None:
    assert input_hash(text) == digest


# --- decide: what one skill needs ---------------------------------------------------------------


def test_a_new_published_skill_needs_embedding() -> None:
    decision = decide(skill(), None, CONFIG)

    assert decision.needs_embedding
    assert decision.text == "Review pull requests Flag risky changes"


def test_a_skill_with_a_matching_row_is_unchanged() -> None:
    record = skill()
    assert decide(record, stored_for(record), CONFIG).action is Outcome.UNCHANGED


@pytest.mark.parametrize(
    "stored",
    [
        StoredEmbedding(input_hash("an older text"), "nomic-embed-text", 768),
        stored_for(skill(), model="mxbai-embed-large"),
        stored_for(skill(), dimensions=512),
    ],
    ids=["stale-text", "other-model", "other-size"],
)
def test_a_row_from_another_text_model_or_size_is_redone(stored: StoredEmbedding) -> None:
    assert decide(skill(), stored, CONFIG).needs_embedding


def test_force_redoes_a_current_row() -> None:
    record = skill()
    assert decide(record, stored_for(record), CONFIG, force=True).needs_embedding


@pytest.mark.parametrize("status", ["draft", "pending_review", "approved", "rejected"])
def test_a_skill_that_is_not_published_is_removed(status: str) -> None:
    record = skill(status)
    assert decide(record, stored_for(record), CONFIG).action is Outcome.REMOVED


def test_a_disabled_tenant_gets_nothing_embedded() -> None:
    off = TenantConfig(False, CONFIG.ollama_url, CONFIG.model, CONFIG.dimensions)
    assert decide(skill(), None, off).action is Outcome.DISABLED


# --- retries ----------------------------------------------------------------------------------


def test_transient_errors_retry_until_the_bound_and_permanent_ones_never() -> None:
    down = OllamaUnavailable("down")
    assert should_retry(down, retries=0, max_retries=3)
    assert not should_retry(down, retries=3, max_retries=3)
    assert not should_retry(ModelNotFound("pull it"), retries=0, max_retries=3)
    assert not should_retry(ValueError("a bug"), retries=0, max_retries=3)


@pytest.mark.parametrize("retries", range(12))
def test_backoff_grows_with_jitter_and_stays_under_the_cap(retries: int) -> None:
    delays = {backoff_seconds(retries, base=2.0, cap=60.0) for _ in range(50)}

    ceiling = min(60.0, 2.0 * 2**retries)
    assert all(1.0 <= delay <= ceiling for delay in delays)
    assert len(delays) > 1  # jitter: workers that failed together do not retry together


# --- DATABASE_URL as the app writes it ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgres://app:pw@db:5432/everyskill", "postgresql+psycopg://app:pw@db:5432/everyskill"),
        ("postgresql://app@db/everyskill", "postgresql+psycopg://app@db/everyskill"),
        (
            "postgresql://app@/everyskill?host=/var/run/postgresql",
            "postgresql+psycopg://app@/everyskill?host=%2Fvar%2Frun%2Fpostgresql",
        ),
    ],
)
def test_the_apps_database_url_is_accepted(raw: str, expected: str) -> None:
    assert normalise_database_url(raw) == expected


def test_a_password_never_reaches_a_log_line() -> None:
    assert mask_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert mask_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
