"""Idempotent mutations (a retried request_id answers as the first call did) and the
audit log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlite_utils import Database

from common.store.errors import (
    ConflictError,
)
from common.store.ops.base import Op, clock, fetch_one, insert_record, to_json
from common.store.records import (
    AuditEntry,
    IdempotentOutcome,
    IdempotentRecord,
    from_row,
)


def lookup_idempotent(caller_id: str, method: str, request_id: str) -> Op[IdempotentRecord | None]:
    """The recorded answer to this (caller, method, request_id), or None."""

    def op(db: Database) -> IdempotentRecord | None:
        row = fetch_one(
            db,
            "SELECT * FROM idempotency WHERE caller_id = ? AND method = ? AND request_id = ?",
            [caller_id, method, request_id],
        )
        return None if row is None else from_row(IdempotentRecord, row)

    return op


def record_idempotent(
    caller_id: str,
    method: str,
    request_id: str,
    payload_sha256: str,
    response: bytes,
    now: float | None = None,
) -> Op[IdempotentRecord]:
    """Record the answer to a request. If one is already recorded with the same payload
    hash, that one is kept and returned; with a different hash, ConflictError."""

    def op(db: Database) -> IdempotentRecord:
        existing = lookup_idempotent(caller_id, method, request_id)(db)
        if existing is not None:
            _check_same_payload(existing, payload_sha256)
            return existing
        row = {
            "caller_id": caller_id, "method": method, "request_id": request_id,
            "payload_sha256": payload_sha256, "response": bytes(response),
            "created_at": clock(now),
        }  # fmt: skip
        return insert_record(db, "idempotency", IdempotentRecord, row)

    return op


def _check_same_payload(record: IdempotentRecord, payload_sha256: str) -> None:
    if record.payload_sha256 != payload_sha256:
        raise ConflictError(
            f"request_id {record.request_id!r} of {record.method} was already used "
            "with a different payload"
        )


def run_idempotent(
    caller_id: str,
    method: str,
    request_id: str,
    payload_sha256: str,
    work: Op[bytes],
    now: float | None = None,
) -> Op[IdempotentOutcome]:
    """Replay the recorded response, or run `work` (returning the serialized response)
    and record it in the same transaction. Looking up inside the write makes concurrent
    retries safe: the writer serializes them, so `work` runs once per request_id."""

    def op(db: Database) -> IdempotentOutcome:
        existing = lookup_idempotent(caller_id, method, request_id)(db)
        if existing is not None:
            _check_same_payload(existing, payload_sha256)
            return IdempotentOutcome(existing.response, replayed=True)
        response = work(db)
        record_idempotent(caller_id, method, request_id, payload_sha256, response, now)(db)
        return IdempotentOutcome(bytes(response), replayed=False)

    return op


def audit(
    user_id: str | None, action: str, detail: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> Op[int]:  # fmt: skip
    """Append an audit entry (who did what); return its id."""

    def op(db: Database) -> int:
        cursor = db.conn.execute(
            "INSERT INTO audit (at, user_id, action, detail_json) VALUES (?, ?, ?, ?)",
            [clock(now), user_id, action, to_json(dict(detail or {}))],
        )
        return int(cursor.lastrowid or 0)

    return op


def list_audit(limit: int = 100) -> Op[list[AuditEntry]]:
    """Audit entries, newest first."""

    def op(db: Database) -> list[AuditEntry]:
        rows = db.table("audit").rows_where(order_by="id DESC", limit=limit or None)
        return [from_row(AuditEntry, row) for row in rows]

    return op
