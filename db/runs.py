"""Runs (backfills and a switch's staging) in the database: counts survive any process, and each
skill counts once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, text

from db.sql import rowcount

# How a job's outcome adds to the run's counters.
COUNTER = {
    "embedded": "embedded",
    "unchanged": "unchanged",
    "failed": "failed",
}
FAILED = "failed"
SKIPPED = "skipped"  # removed, disabled, superseded, vanished: neither embedded nor a failure
BACKFILL = "backfill"  # a run's kind: live vectors of the tenants' own models
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
    unpublished: int = 0  # skills of the run unpublished before it ended (set when it ends)
    deleted: int = 0  # and deleted
    kind: str = BACKFILL  # or SWITCH: a model switch's staging run
    model: str | None = None  # a switch's new model

    @property
    def done(self) -> int:
        return self.embedded + self.unchanged + self.failed + self.skipped

    @property
    def current(self) -> int:
        """Skills that end the run with a current embedding (the X of the summary)."""
        return self.embedded + self.unchanged

    @property
    def left(self) -> int:
        """Skills of the run that left the catalog before it ended."""
        return self.unpublished + self.deleted


@dataclass(frozen=True, slots=True)
class Final:
    """A run's counts at its end: the summary's X (embedded + unchanged), Y (total), Z (failed)."""

    embedded: int
    unchanged: int
    failed: int
    skipped: int
    unpublished: int
    deleted: int


class Closer(Protocol):
    """Decides, in the transaction that records a run's last outcome, the run's final counts;
    None when it handed items back to be embedded again (the run is not over)."""

    def __call__(self, conn: Connection, run_id: str) -> Final | None: ...


class Closers(Protocol):
    """The closer for a kind of run (tasks.progress.Closing: the runtime's hooks)."""

    def for_kind(self, kind: str) -> Closer: ...


RUN_COLUMNS = (
    "id, tenant_id, force, total, embedded, unchanged, failed, skipped, fanned_out, started_at,"
    " finished_at, unpublished, deleted, kind, model"
)


def _state(row: Any) -> RunState:
    return RunState(*row)


def create_run(conn: Connection, run_id: str, tenant_id: str | None, force: bool) -> bool:
    """Record a new run; False when it exists already (its message was delivered again)."""
    result = conn.execute(
        text(
            "INSERT INTO embedding_runs (id, tenant_id, force) VALUES (:id, :tenant, :force)"
            " ON CONFLICT (id) DO NOTHING"
        ),
        {"id": run_id, "tenant": tenant_id, "force": force},
    )
    return rowcount(result) == 1


def pending_count(conn: Connection, run_id: str) -> int:
    return int(
        conn.execute(
            text("SELECT count(*) FROM embedding_run_items WHERE run_id = :id AND outcome IS NULL"),
            {"id": run_id},
        ).scalar_one()
    )


def add_tenant_items(
    conn: Connection, run_id: str, tenant_id: str, published: int, skill_ids: Sequence[str]
) -> None:
    """Record the tenant's skills that need work (`skill_ids`, of its `published`) as run items.

    Skills already current get no item: the run counts them (`unchanged`) and names the tenant,
    and its close counts the tenant's current skills from the catalog (db.run_close), so a run
    over a catalog that changed little writes little.
    """
    conn.execute(
        text(
            """
            INSERT INTO embedding_run_items (run_id, skill_id, tenant_id, position)
            SELECT :run_id, s.skill_id, :tenant_id, s.position
            FROM unnest(CAST(:ids AS text[])) WITH ORDINALITY AS s(skill_id, position)
            ON CONFLICT DO NOTHING
            """
        ),
        {"run_id": run_id, "tenant_id": tenant_id, "ids": list(skill_ids)},
    )
    conn.execute(
        text(
            "UPDATE embedding_runs SET total = total + :published,"
            " unchanged = unchanged + :current,"
            " tenants = array_append(coalesce(tenants, '{}'), CAST(:tenant AS text))"
            " WHERE id = :id"
        ),
        {"published": published, "current": published - len(skill_ids), "tenant": tenant_id,
         "id": run_id},
    )  # fmt: skip


def prune_finished(conn: Connection, keep_seconds: float) -> int:
    """Delete runs (and, by cascade, their items) finished more than `keep_seconds` ago; the
    count deleted. The newest run stays whatever its age (`status` shows it), and so does a
    run a model switch still names."""
    result = conn.execute(
        text(
            """
            DELETE FROM embedding_runs r
            WHERE r.finished_at < now() - make_interval(secs => :keep)
              AND r.id <> (SELECT id FROM embedding_runs ORDER BY started_at DESC LIMIT 1)
              AND NOT EXISTS (SELECT 1 FROM embedding_switches s WHERE s.run_id = r.id)
            """
        ),
        {"keep": keep_seconds},
    )
    return rowcount(result)


def iter_pending_items(conn: Connection, run_id: str) -> Iterator[tuple[str, str]]:
    """(skill_id, tenant_id) of the run's items without an outcome, streamed."""
    result = conn.execute(
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
    conn: Connection, run_id: str, after: ItemKey | None, limit: int
) -> list[tuple[str, str, int]]:
    """(skill_id, tenant_id, position) of the next `limit` items in queue order that needed work
    when the run started, done or not."""
    rows = conn.execute(
        text(
            "SELECT skill_id, tenant_id, position FROM embedding_run_items"
            " WHERE run_id = :id AND needed_work AND (CAST(:tenant AS text) IS NULL"
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


def mark_fanned_out(conn: Connection, run_id: str, close: Closers | None = None) -> RunState | None:
    """Every item's job is queued; returns the run if that completed it."""
    conn.execute(text("UPDATE embedding_runs SET fanned_out = true WHERE id = :id"), {"id": run_id})
    return _finish_if_complete(conn, run_id, close)


def record_outcome(
    conn: Connection,
    run_id: str,
    skill_id: str,
    outcome: str,
    detail: str | None = None,
    close: Closers | None = None,
) -> tuple[RunState, bool] | None:
    """Set the item's outcome once; (run, this call finished the run), or None if already set.

    A redelivered or duplicated job finds the outcome set and changes nothing: the run's counts
    and its one summary line stay right whatever was retried, killed or enqueued twice.
    """
    recorded = record_outcomes(conn, run_id, [(skill_id, outcome, detail)], close)
    if not recorded.skill_ids:
        return None
    return recorded.state, recorded.finished


@dataclass(frozen=True, slots=True)
class Recorded:
    state: RunState
    finished: bool
    skill_ids: list[str]  # those whose outcome this call set, in the order given


def record_outcomes(
    conn: Connection,
    run_id: str,
    outcomes: Sequence[tuple[str, str, str | None]],
    close: Closers | None = None,
) -> Recorded:
    """Set many items' outcomes (skill_id, outcome, detail) in two statements; each counts once.

    When that leaves no item pending, `close` decides the run's final counts (without it, they
    stay as recorded)."""
    rows = conn.execute(
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
    row = conn.execute(
        text(
            "UPDATE embedding_runs SET embedded = embedded + :embedded,"
            " unchanged = unchanged + :unchanged, failed = failed + :failed,"
            f" skipped = skipped + :skipped WHERE id = :id RETURNING {RUN_COLUMNS}"
        ),
        {"id": run_id, **counts},
    ).one()
    finished = _finish_if_complete(conn, run_id, close) if set_now else None
    return Recorded(
        state=finished or _state(row),
        finished=finished is not None,
        skill_ids=[o[0] for o in outcomes if o[0] in set_now],
    )


def _finish_if_complete(
    conn: Connection, run_id: str, close: Closers | None = None
) -> RunState | None:
    row = conn.execute(
        text(
            "SELECT total, embedded + unchanged + failed + skipped AS done, kind"
            " FROM embedding_runs WHERE id = :id AND finished_at IS NULL FOR UPDATE"
        ),
        {"id": run_id},
    ).one_or_none()
    if row is None or row.done < row.total:
        return None
    final = close.for_kind(row.kind)(conn, run_id) if close is not None else None
    if close is not None and final is None:
        return None  # items went back to be embedded again
    values = (
        {}
        if final is None
        else {
            "embedded": final.embedded,
            "unchanged": final.unchanged,
            "failed": final.failed,
            "skipped": final.skipped,
            "unpublished": final.unpublished,
            "deleted": final.deleted,
            "total": final.embedded + final.unchanged + final.failed + final.skipped,
        }
    )
    assignments = "".join(f", {column} = :{column}" for column in values)
    finished = conn.execute(
        text(
            f"UPDATE embedding_runs SET finished_at = now(){assignments} WHERE id = :id"
            f" RETURNING {RUN_COLUMNS}"
        ),
        {"id": run_id, **values},
    ).one()
    return _state(finished)


def kept(conn: Connection) -> tuple[int, int]:
    """(runs, items) the worker's tables hold now."""
    row = conn.execute(
        text(
            "SELECT (SELECT count(*) FROM embedding_runs) AS runs,"
            " (SELECT count(*) FROM embedding_run_items) AS items"
        )
    ).one()
    return int(row.runs), int(row.items)


def get_run(conn: Connection, run_id: str) -> RunState | None:
    row = conn.execute(
        text(f"SELECT {RUN_COLUMNS} FROM embedding_runs WHERE id = :id"), {"id": run_id}
    ).one_or_none()
    return _state(row) if row else None


def latest_run(conn: Connection) -> RunState | None:
    row = conn.execute(
        text(f"SELECT {RUN_COLUMNS} FROM embedding_runs ORDER BY started_at DESC LIMIT 1")
    ).one_or_none()
    return _state(row) if row else None


def unfinished_runs(conn: Connection) -> list[RunState]:
    """Runs without a summary yet, fanned out or not (a lost fan-out step stops one midway)."""
    rows = conn.execute(
        text(
            f"SELECT {RUN_COLUMNS} FROM embedding_runs WHERE finished_at IS NULL"
            " ORDER BY started_at"
        )
    )
    return [_state(row) for row in rows]
