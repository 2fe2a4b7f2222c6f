"""Policy versions and which one serves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlite_utils import Database

from common.store.ops.base import Op, clock, fetch_one, get_one, get_or_raise, insert_row, to_json
from common.store.records import (
    Policy,
    PolicyStatus,
    from_row,
)


def _policy_or_raise(db: Database, version: int) -> Policy:
    return get_or_raise(db, Policy, "SELECT * FROM policies WHERE version = ?", version, "policy")


def _make_serving(db: Database, version: int, at: float) -> None:
    """Retire whatever serves now, then serve `version` (the unique index allows one)."""
    db.conn.execute(
        "UPDATE policies SET status = 'retired' WHERE status = 'serving' AND version != ?",
        [version],
    )
    db.conn.execute(
        "UPDATE policies SET status = 'serving', serving_since = ? WHERE version = ?",
        [at, version],
    )


def add_policy(
    version: int,
    path: str,
    *,
    parent_version: int | None = None,
    status: PolicyStatus = "candidate",
    cycle_id: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> Op[Policy]:
    """Record a published checkpoint; status "serving" also retires the serving one."""

    def op(db: Database) -> Policy:
        at = clock(now)
        row = {
            "version": version, "path": path, "parent_version": parent_version,
            "status": "candidate" if status == "serving" else status, "created_at": at,
            "cycle_id": cycle_id, "metrics_json": to_json(dict(metrics or {})),
            "serving_since": None,
        }  # fmt: skip
        insert_row(db, "policies", row)
        if status == "serving":
            _make_serving(db, version, at)
        return _policy_or_raise(db, version)

    return op


def set_policy_status(version: int, status: PolicyStatus, now: float | None = None) -> Op[Policy]:
    """Change a policy's status; "serving" retires the one serving before, atomically."""

    def op(db: Database) -> Policy:
        _policy_or_raise(db, version)
        if status == "serving":
            _make_serving(db, version, clock(now))
        else:
            db.conn.execute("UPDATE policies SET status = ? WHERE version = ?", [status, version])
        return _policy_or_raise(db, version)

    return op


def serving_policy() -> Op[Policy | None]:
    """The policy serving now, or None."""

    def op(db: Database) -> Policy | None:
        row = fetch_one(db, "SELECT * FROM policies WHERE status = 'serving'", [])
        return None if row is None else from_row(Policy, row)

    return op


def previous_serving_policy() -> Op[Policy | None]:
    """The policy that served before the current one (rollback's default), or None."""

    def op(db: Database) -> Policy | None:
        row = fetch_one(
            db,
            "SELECT * FROM policies WHERE status != 'serving' AND serving_since IS NOT NULL "
            "ORDER BY serving_since DESC LIMIT 1",
            [],
        )
        return None if row is None else from_row(Policy, row)

    return op


def get_policy(version: int) -> Op[Policy | None]:
    """One policy, or None."""
    return get_one(Policy, "policies", "version", version)


def list_policies(limit: int = 0) -> Op[list[Policy]]:
    """Policies, newest version first; `limit` 0 means all."""

    def op(db: Database) -> list[Policy]:
        rows = db.table("policies").rows_where(order_by="version DESC", limit=limit or None)
        return [from_row(Policy, row) for row in rows]

    return op
