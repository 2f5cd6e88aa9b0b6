"""METRICS_PORT: the worker's Prometheus endpoint, scraped while a backfill runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.fake_ollama import FakeOllama
from devstack.ports import free_port
from tests.backfills import call_backfill, published_catalog
from tests.databases import TENANT_A, TENANT_B, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    return sum(
        v for (n, found), v in samples.items() if n == name and set(labels.items()) <= set(found)
    )


@pytest.fixture
def metrics_url(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**embedder_env, "METRICS_PORT": str(port), "EMBED_BATCH_SIZE": "2"}
    process: Process = start_worker(env, tmp_path / "worker.log")
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        process.kill()  # the test is over: its shutdown is not under test
    assert "Traceback" not in process.log()


@pytest.mark.slow
def test_metrics_follow_a_backfill_until_the_queue_is_empty(
    db: Database, metrics_url: str, embedder_env: dict[str, str], ollama: FakeOllama
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    published_catalog(db, 14)
    published_catalog(db, 6, TENANT_B)
    ollama.request_latency = 0.15  # ten requests: long enough to see jobs waiting
    before = scrape(metrics_url)
    assert value(before, "embedder_queue_depth", queue="embed_bulk") == 0
    assert value(before, "embedder_queue_depth", queue="celery") == 0

    call_backfill(embedder_env)
    depths = []

    def finished() -> bool:
        samples = scrape(metrics_url)
        depths.append(value(samples, "embedder_queue_depth", queue="embed_bulk"))
        return value(samples, "embedder_backfill_items", state="pending") == 0 and (
            value(samples, "embedder_queue_depth", queue="embed_bulk") == 0
        )

    wait_until(finished, timeout=60, what="no pending item and an empty bulk queue")

    assert max(d or 0 for d in depths) > 0
    samples = scrape(metrics_url)
    rows_a = db.scalar("SELECT count(*) FROM skill_embeddings WHERE tenant_id = :t", t=TENANT_A)
    rows_b = db.scalar("SELECT count(*) FROM skill_embeddings WHERE tenant_id = :t", t=TENANT_B)
    assert (rows_a, rows_b) == (14, 6)
    embedded = "embedder_embeddings_total"
    assert value(samples, embedded, tenant=TENANT_A, outcome="embedded") == rows_a
    assert value(samples, embedded, tenant=TENANT_B, outcome="embedded") == rows_b
    assert total(samples, embedded) == 20
    assert value(samples, "embedder_backfill_items", state="embedded") == 20
    assert value(samples, "embedder_backfill_items", state="total") == 20
    assert value(samples, "embedder_backfill_items", state="failed") == 0
    # Ten /api/embed calls of two skills, plus the backfill's /api/show preflight.
    assert total(samples, "embedder_ollama_request_seconds_count") == ollama.requests + 1
    assert total(samples, "embedder_ollama_request_seconds_sum") >= 0.15 * ollama.requests
    assert not any("run_id" in dict(labels) for _, labels in samples)
