"""Backfill runs in the database: counts survive any process, and each skill counts once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Result, text
from sqlalchemy.orm import Session

from db.services import NEEDS_WORK_SQL

# How a job's outcome adds to the run's counters.
COUNTER = {
    "embedded": "embedded",
    "unchanged": "unchanged",
    "failed": "failed",
}
FAILED = "failed"
SKIPPED = "skipped"  # removed, disabled, superseded, vanished: neither embedded nor a failure
SWITCH = "switch"  # a run's kind: staging a model switch (db.staging)


@dataclass(frozen=True, slots=True)
class RunState:
    id: str
    tenant_id: str | None
    force: bool
    total: int
    embedded: int
    unchanged: int
    failed: int
    skipped: int
    fanned_out: bool
    started_at: datetime
    finished_at: datetime | None
    kind: str = "backfill"  # or SWITCH: a model switch's staging run
    model: str | None = None  # a switch's new model

    @property
    def done(self) -> int:
        return self.embedded + self.unchanged + self.failed + self.skipped

    @property
    def current(self) -> int:
        """Skills that end the run with a current embedding (the X of the summary)."""
        return self.embedded + self.unchanged

    @property
    def summary(self) -> str:
        if self.kind == SWITCH:
            return (
                f"Done. Staged {self.current}/{self.total} skills for {self.model}."
                f" {self.failed} failures."
            )
        return f"Done. Embedded {self.current}/{self.total} skills. {self.failed} failures."


RUN_COLUMNS = (
    "id, tenant_id, force, total, embedded, unchanged, failed, skipped, fanned_out, started_at,"
    " finished_at, kind, model"
)


def _rowcount(result: Result[Any]) -> int:
    return int(getattr(result, "rowcount", 0))


def _state(row: Any) -> RunState:
    return RunState(*row)


def create_run(session: Session, run_id: str, tenant_id: str | None, force: bool) -> bool:
    """Record a new run; False when it exists already (its message was delivered again)."""
    result = session.execute(
        text(
            "INSERT INTO embedding_runs (id, tenant_id, force) VALUES (:id, :tenant, :force)"
            " ON CONFLICT (id) DO NOTHING"
        ),
        {"id": run_id, "tenant": tenant_id, "force": force},
    )
    return _rowcount(result) == 1


def pending_count(session: Session, run_id: str) -> int:
    return int(
        session.execute(
            text("SELECT count(*) FROM embedding_run_items WHERE run_id = :id AND outcome IS NULL"),
            {"id": run_id},
        ).scalar_one()
    )


def add_tenant_items(
    session: Session, run_id: str, tenant_id: str, *, model: str, dimensions: int, force: bool
) -> tuple[int, int]:
    """Record the tenant's skills that need work as run items; (published, queued).

    Runs in the tenant's scope: the selection happens in SQL, nothing is held in memory.
    """
    queued = _rowcount(
        session.execute(
            text(
                f"""
            INSERT INTO embedding_run_items (run_id, skill_id, tenant_id, position)
            SELECT :run_id, skill_id, :tenant_id, row_number() OVER (ORDER BY skill_id)
            FROM ({NEEDS_WORK_SQL}) AS needs_work
            ON CONFLICT DO NOTHING
            """
            ),
            {
                "run_id": run_id,
                "tenant_id": tenant_id,
                "model": model,
                "dimensions": dimensions,
                "force": force,
            },
        )
    )
    published = session.execute(
        text("SELECT count(*) FROM skills WHERE tenant_id = :t AND status = 'published'"),
        {"t": tenant_id},
    ).scalar_one()
    session.execute(
        text(
            "UPDATE embedding_runs SET total = total + :published,"
            " unchanged = unchanged + :current WHERE id = :id"
        ),
        {"published": published, "current": published - queued, "id": run_id},
    )
    return int(published), int(queued)


def iter_pending_items(session: Session, run_id: str) -> Iterator[tuple[str, str]]:
    """(skill_id, tenant_id) of the run's items without an outcome, streamed."""
    result = session.execute(
        text(
            "SELECT skill_id, tenant_id FROM embedding_run_items"
            " WHERE run_id = :id AND outcome IS NULL ORDER BY tenant_id, position"
        ).execution_options(yield_per=2000),
        {"id": run_id},
    )
    for row in result:
        yield str(row.skill_id), str(row.tenant_id)


ItemKey = tuple[str, int]  # (tenant_id, position): the order jobs are queued in


def items_after(
    session: Session, run_id: str, after: ItemKey | None, limit: int
) -> list[tuple[str, str, int]]:
    """(skill_id, tenant_id, position) of the next `limit` items in queue order, done or not."""
    rows = session.execute(
        text(
            "SELECT skill_id, tenant_id, position FROM embedding_run_items"
            " WHERE run_id = :id AND (CAST(:tenant AS text) IS NULL"
            "   OR (tenant_id, position) > (CAST(:tenant AS text), CAST(:position AS integer)))"
            " ORDER BY tenant_id, position LIMIT :limit"
        ),
        {
            "id": run_id,
            "tenant": after[0] if after else None,
            "position": after[1] if after else None,
            "limit": limit,
        },
    )
    return [(str(r.skill_id), str(r.tenant_id), int(r.position)) for r in rows]


def mark_fanned_out(session: Session, run_id: str) -> RunState | None:
    """Every item's job is queued; returns the run if that completed it."""
    session.execute(
        text("UPDATE embedding_runs SET fanned_out = true WHERE id = :id"), {"id": run_id}
    )
    return _finish_if_complete(session, run_id)


def record_outcome(
    session: Session, run_id: str, skill_id: str, outcome: str, detail: str | None = None
) -> tuple[RunState, bool] | None:
    """Set the item's outcome once; (run, this call finished the run), or None if already set.

    A redelivered or duplicated job finds the outcome set and changes nothing: the run's counts
    and its one summary line stay right whatever was retried, killed or enqueued twice.
    """
    recorded = record_outcomes(session, run_id, [(skill_id, outcome, detail)])
    if not recorded.skill_ids:
        return None
    return recorded.state, recorded.finished


@dataclass(frozen=True, slots=True)
class Recorded:
    state: RunState
    finished: bool
    skill_ids: list[str]  # those whose outcome this call set, in the order given


def record_outcomes(
    session: Session, run_id: str, outcomes: Sequence[tuple[str, str, str | None]]
) -> Recorded:
    """Set many items' outcomes (skill_id, outcome, detail) in two statements; each counts once."""
    rows = session.execute(
        text(
            """
            UPDATE embedding_run_items i SET outcome = v.outcome, detail = v.detail,
                   finished_at = now(), attempts = coalesce(i.attempts, 1)
            FROM (SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:outcomes AS text[]),
                                       CAST(:details AS text[])) AS t(skill_id, outcome, detail)) v
            WHERE i.run_id = :run AND i.skill_id = v.skill_id AND i.outcome IS NULL
            RETURNING i.skill_id, i.outcome
            """
        ),
        {
            "run": run_id,
            "ids": [o[0] for o in outcomes],
            "outcomes": [o[1] for o in outcomes],
            "details": [o[2] for o in outcomes],
        },
    ).all()
    set_now = {str(row.skill_id) for row in rows}
    counts = dict.fromkeys((*COUNTER.values(), SKIPPED), 0)
    for row in rows:
        counts[COUNTER.get(str(row.outcome), SKIPPED)] += 1
    # The row lock taken here serialises concurrent recorders, so the completion check is exact.
    row = session.execute(
        text(
            "UPDATE embedding_runs SET embedded = embedded + :embedded,"
            " unchanged = unchanged + :unchanged, failed = failed + :failed,"
            f" skipped = skipped + :skipped WHERE id = :id RETURNING {RUN_COLUMNS}"
        ),
        {"id": run_id, **counts},
    ).one()
    finished = _finish_if_complete(session, run_id) if set_now else None
    return Recorded(
        state=finished or _state(row),
        finished=finished is not None,
        skill_ids=[o[0] for o in outcomes if o[0] in set_now],
    )


def claim_items(
    session: Session, run_id: str, limit: int, *, including: str | None = None
) -> list[tuple[str, str]]:
    """Lock up to `limit` pending items of the run for this transaction; (skill_id, tenant_id).

    The claim is the row lock itself: it lasts until the transaction ends, so a process that
    dies or loses its connection gives its items back at once, with nothing to expire. SKIP
    LOCKED lets claimers on several hosts take batches side by side. With `including`, that
    item comes first, and nothing is claimed unless it could be (another batch holds it).
    """
    claimed: list[tuple[str, str]] = []
    if including is not None:
        own = session.execute(
            text(
                "SELECT skill_id, tenant_id FROM embedding_run_items"
                " WHERE run_id = :run AND skill_id = :skill AND outcome IS NULL"
                " FOR UPDATE SKIP LOCKED"
            ),
            {"run": run_id, "skill": including},
        ).one_or_none()
        if own is None:
            return []
        claimed.append((str(own.skill_id), str(own.tenant_id)))
    if limit > len(claimed):
        rows = session.execute(
            text(
                "SELECT skill_id, tenant_id FROM embedding_run_items"
                " WHERE run_id = :run AND outcome IS NULL"
                "   AND skill_id IS DISTINCT FROM CAST(:skill AS text)"
                " ORDER BY tenant_id, position LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"run": run_id, "skill": including, "limit": limit - len(claimed)},
        )
        claimed += [(str(r.skill_id), str(r.tenant_id)) for r in rows]
    return claimed


def wait_for_item(
    session: Session, run_id: str, skill_id: str, *, timeout_seconds: float
) -> tuple[str | None, str | None] | None:
    """Wait for the batch that holds the item to end, then lock it; (outcome, detail).

    None when the run has no such item. A lock still held after `timeout_seconds` raises
    sqlalchemy's OperationalError (lock_timeout), which callers treat as transient.
    """
    session.execute(
        text("SELECT set_config('lock_timeout', :ms, true)"),
        {"ms": f"{int(timeout_seconds * 1000)}ms"},
    )
    row = session.execute(
        text(
            "SELECT outcome, detail FROM embedding_run_items"
            " WHERE run_id = :run AND skill_id = :skill FOR UPDATE"
        ),
        {"run": run_id, "skill": skill_id},
    ).one_or_none()
    return None if row is None else (row.outcome, row.detail)


def runs_with_free_items(session: Session) -> list[tuple[str, bool]]:
    """(run_id, force) of open runs with a pending item that no batch holds right now."""
    rows = session.execute(
        text(
            """
            SELECT r.id, r.force FROM embedding_runs r
            WHERE r.finished_at IS NULL AND EXISTS (
                SELECT 1 FROM embedding_run_items i
                WHERE i.run_id = r.id AND i.outcome IS NULL
                FOR UPDATE SKIP LOCKED)
            ORDER BY r.started_at
            """
        )
    )
    return [(str(r.id), bool(r.force)) for r in rows]


def item_outcome(session: Session, run_id: str, skill_id: str) -> tuple[str, str | None] | None:
    """(outcome, detail) already recorded for the item (by a batch that took it), if any."""
    row = session.execute(
        text(
            "SELECT outcome, detail FROM embedding_run_items"
            " WHERE run_id = :run AND skill_id = :skill AND outcome IS NOT NULL"
        ),
        {"run": run_id, "skill": skill_id},
    ).one_or_none()
    return None if row is None else (str(row.outcome), row.detail)


def _finish_if_complete(session: Session, run_id: str) -> RunState | None:
    row = session.execute(
        text(
            "UPDATE embedding_runs SET finished_at = now() WHERE id = :id AND finished_at IS NULL"
            " AND embedded + unchanged + failed + skipped >= total"
            f" RETURNING {RUN_COLUMNS}"
        ),
        {"id": run_id},
    ).one_or_none()
    return _state(row) if row else None


def get_run(session: Session, run_id: str) -> RunState | None:
    row = session.execute(
        text(f"SELECT {RUN_COLUMNS} FROM embedding_runs WHERE id = :id"), {"id": run_id}
    ).one_or_none()
    return _state(row) if row else None


def latest_run(session: Session) -> RunState | None:
    row = session.execute(
        text(f"SELECT {RUN_COLUMNS} FROM embedding_runs ORDER BY started_at DESC LIMIT 1")
    ).one_or_none()
    return _state(row) if row else None


def unfinished_runs(session: Session) -> list[RunState]:
    """Runs without a summary yet, fanned out or not (a lost fan-out step stops one midway)."""
    rows = session.execute(
        text(
            f"SELECT {RUN_COLUMNS} FROM embedding_runs WHERE finished_at IS NULL"
            " ORDER BY started_at"
        )
    )
    return [_state(row) for row in rows]
