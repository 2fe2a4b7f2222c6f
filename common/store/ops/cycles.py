"""The trainer's cycles: a state machine with one running cycle, heartbeats and stale
cycles failed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sqlite_utils import Database

from common.store.errors import (
    ConflictError,
)
from common.store.ops.base import Op, clock, get_one, get_or_raise, to_json
from common.store.records import (
    CYCLE_TERMINAL_STATES,
    Cycle,
    CycleState,
    from_row,
)

# Allowed state changes through update_cycle; queued → running only via claim_queued_cycle.
_CYCLE_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"skipped", "failed"}),
    "running": frozenset({"promoted", "rejected", "skipped", "failed"}),
}


def _cycle_or_raise(db: Database, cycle_id: int) -> Cycle:
    return get_or_raise(db, Cycle, "SELECT * FROM cycles WHERE id = ?", cycle_id, "cycle")


def create_cycle(
    trigger: str, reason: str = "", base_version: int | None = None, now: float | None = None
) -> Op[Cycle]:
    """Queue a cycle (`trigger`: "schedule", "admin" or "cli")."""

    def op(db: Database) -> Cycle:
        cursor = db.conn.execute(
            "INSERT INTO cycles (state, trigger, reason, created_at, base_version) "
            "VALUES ('queued', ?, ?, ?, ?)",
            [trigger, reason, clock(now), base_version],
        )
        return _cycle_or_raise(db, int(cursor.lastrowid or 0))

    return op


def claim_queued_cycle(owner_pid: int | None = None, now: float | None = None) -> Op[Cycle | None]:
    """Start the oldest queued cycle, unless one is running; None when nothing was claimed.

    One UPDATE does it, and the `cycles_one_running` unique index backs it, so two
    trainers (even in two processes) can never both run a cycle.
    """

    def op(db: Database) -> Cycle | None:
        at = clock(now)
        row = db.conn.execute(
            "UPDATE cycles SET state = 'running', started_at = ?, heartbeat_at = ?, owner_pid = ? "
            "WHERE id = (SELECT MIN(id) FROM cycles WHERE state = 'queued') "
            "AND NOT EXISTS (SELECT 1 FROM cycles WHERE state = 'running') RETURNING id",
            [at, at, os.getpid() if owner_pid is None else owner_pid],
        ).fetchone()
        return None if row is None else _cycle_or_raise(db, row[0])

    return op


def update_cycle(
    cycle_id: int,
    *,
    state: CycleState | None = None,
    stage: str | None = None,
    error: str | None = None,
    base_version: int | None = None,
    candidate_version: int | None = None,
    stage_metrics: Mapping[str, Any] | None = None,
    heartbeat: bool = False,
    now: float | None = None,
) -> Op[Cycle]:
    """Update a cycle's fields that are given; `stage_metrics` ({stage: metrics}) is merged
    into its metrics; a terminal state stamps `finished_at`; `heartbeat` stamps
    `heartbeat_at`. Raises ConflictError on a transition `_CYCLE_TRANSITIONS` forbids."""

    def op(db: Database) -> Cycle:
        at = clock(now)
        cycle = _cycle_or_raise(db, cycle_id)
        changes: dict[str, Any] = {
            k: v
            for k, v in dict(
                stage=stage,
                error=error,
                base_version=base_version,
                candidate_version=candidate_version,
            ).items()  # fmt: skip
            if v is not None
        }
        if state is not None and state != cycle.state:
            if state not in _CYCLE_TRANSITIONS.get(cycle.state, frozenset()):
                raise ConflictError(f"cycle {cycle_id}: {cycle.state} → {state} is not allowed")
            changes["state"] = state
            if state in CYCLE_TERMINAL_STATES:
                changes["finished_at"] = at
        if stage_metrics:
            changes["metrics_json"] = to_json({**cycle.metrics, **stage_metrics})
        if heartbeat:
            changes["heartbeat_at"] = at
        if changes:
            db.table("cycles").update(cycle_id, changes)
        return _cycle_or_raise(db, cycle_id)

    return op


def fail_stale_cycles(stale_after_s: float, now: float | None = None) -> Op[list[int]]:
    """Fail running cycles whose trainer has not heartbeaten for `stale_after_s` seconds
    (it died); return their ids, freeing the queue."""

    def op(db: Database) -> list[int]:
        at = clock(now)
        rows = db.conn.execute(
            "UPDATE cycles SET state = 'failed', finished_at = ?, "
            "error = 'the trainer stopped heartbeating (it died or hung)' "
            "WHERE state = 'running' AND COALESCE(heartbeat_at, started_at, created_at) < ? "
            "RETURNING id",
            [at, at - stale_after_s],
        ).fetchall()
        return sorted(r[0] for r in rows)

    return op


def get_cycle(cycle_id: int) -> Op[Cycle | None]:
    """One cycle, or None."""
    return get_one(Cycle, "cycles", "id", cycle_id)


def list_cycles(limit: int = 50, state: CycleState | None = None) -> Op[list[Cycle]]:
    """Cycles, newest first, optionally in one state; `limit` 0 means all."""

    def op(db: Database) -> list[Cycle]:
        rows = db.table("cycles").rows_where(
            None if state is None else "state = ?",
            None if state is None else [state],
            order_by="id DESC",
            limit=limit or None,
        )
        return [from_row(Cycle, row) for row in rows]

    return op
