"""Batching for backfills: a bulk job embeds waiting jobs of its run in the same Ollama call.

Every skill keeps its own queued job (retried, counted and visible in Flower on its own). The
job that runs first claims up to EMBED_BATCH_SIZE - 1 pending neighbours of its run, embeds
them all in one `/api/embed` call and one upsert, and records their outcomes; when a
neighbour's own job arrives it finds its outcome recorded and returns at once. Jobs from the
app carry no run and are never batched, so they never wait for a batch to fill.
"""

from __future__ import annotations

from db import runs
from db.session import unscoped
from tasks.embedding import Embedded, EmbedRequest, Result, embed_skills
from tasks.runtime import Runtime


def outcome_already_recorded(rt: Runtime, run_id: str, skill_id: str) -> str | None:
    with unscoped(rt.sessions) as session:
        return runs.item_outcome(session, run_id, skill_id)


def embed_with_neighbours(
    rt: Runtime, run_id: str, request: EmbedRequest
) -> tuple[Result, list[tuple[str, str, str]]]:
    """This job's result, and (skill_id, outcome, name) of the neighbours embedded with it.

    A neighbour that failed is handed back unrecorded: its own job retries it on its own.
    """
    with unscoped(rt.sessions) as session:
        neighbours = runs.claim_items(
            session, run_id, request.skill_id, rt.settings.embed_batch_size - 1
        )
    requests = [request, *(EmbedRequest(sid, tid, request.force) for sid, tid in neighbours)]
    results = embed_skills(rt, requests)
    done: list[tuple[str, str, str]] = []
    handed_back: list[str] = []
    for (skill_id, _), result in zip(neighbours, results[1:], strict=True):
        if isinstance(result, Embedded):
            done.append((skill_id, result.outcome.value, result.name))
        else:
            handed_back.append(skill_id)
    if handed_back:
        with unscoped(rt.sessions) as session:
            runs.release_claims(session, run_id, handed_back)
    return results[0], done
