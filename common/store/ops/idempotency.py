"""Idempotent mutations (a retried request_id answers as the first call did) and the
audit log: `run_mutation` / `replay_mutation` + `commit_mutation` are the one way a
Feedback or Admin mutation is committed (see "mutations" below).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
        raise _other_payload(record.method, record.request_id)


def _other_payload(method: str, request_id: str) -> ConflictError:
    name = method.rsplit("/", 1)[-1]
    return ConflictError(
        f"request_id {request_id!r} was already used for a different {name} request "
        "(a different payload); use a new request_id for a new request"
    )


# ---------------------------------------------------------------- mutations
#
# THE helper of every mutating Feedback and Admin call: a retried request_id answers as
# the first call did, and every accepted mutation appends one audit row (who, what, when)
# in the SAME transaction as the mutation, so none can be committed without its row. A
# replayed answer is not a new mutation: it writes nothing.


@dataclass(frozen=True)
class Mutation:
    """Who asks for which change, under which request_id."""

    user_id: str
    role: str
    action: str  # the audit row's action, e.g. "feedback.SubmitRanking"
    method: str  # the idempotency record's method, e.g. "rlhf.v1.Feedback/SubmitRanking"
    request_id: str = ""  # "" : not retry-safe (runs every time, audited every time)
    payload_sha256: str = ""  # what the request asks for, its request_id excluded
    ids: Mapping[str, Any] = field(default_factory=dict)  # the request's ids, never its text


def replay_mutation(
    mutation: Mutation, still_valid: Callable[[Database, bytes], bool] | None = None
) -> Op[bytes | None]:
    """The answer recorded under the mutation's request_id, or None (no request_id, none
    recorded, or `still_valid` says the recorded one is stale: e.g. an expired lease).
    ConflictError when the id was used with another payload."""

    def op(db: Database) -> bytes | None:
        if not mutation.request_id:
            return None
        # One plain query: this runs on every submission (SubmitRanking is the hot path), where
        # sqlite-utils' query() and from_row cost more than the SQL.
        row = db.conn.execute(
            "SELECT payload_sha256, response FROM idempotency WHERE caller_id = ? AND method = ? AND request_id = ?",
            [mutation.user_id, mutation.method, mutation.request_id]).fetchone()  # fmt: skip
        if row is None:
            return None
        if row[0] != mutation.payload_sha256:
            raise _other_payload(mutation.method, mutation.request_id)
        answer = bytes(row[1])
        return None if still_valid is not None and not still_valid(db, answer) else answer

    return op


def commit_mutation(
    mutation: Mutation,
    work: Op[bytes],
    *,
    result_ids: Callable[[bytes], Mapping[str, Any]] | None = None,
    now: float | None = None,
) -> Op[bytes]:
    """Run `work` (the change; it returns the serialized answer), record the answer under
    the request_id (replacing a stale record) and append the audit row: call it inside the
    mutation's transaction. `result_ids` names what the change made (e.g. the ranking id)."""

    def op(db: Database) -> bytes:
        at = clock(now)
        answer = bytes(work(db))
        if mutation.request_id:  # the primary key (caller, method, request_id): a stale record is replaced
            db.conn.execute(
                "INSERT OR REPLACE INTO idempotency (caller_id, method, request_id, payload_sha256, response, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [mutation.user_id, mutation.method, mutation.request_id, mutation.payload_sha256, answer, at])  # fmt: skip
        detail = {"role": mutation.role, **mutation.ids, **(result_ids(answer) if result_ids else {}), "outcome": "OK"}
        if mutation.request_id:
            detail["request_id"] = mutation.request_id
        audit(mutation.user_id, mutation.action, detail, now=at)(db)
        return answer

    return op


def run_mutation(
    mutation: Mutation,
    work: Op[bytes],
    *,
    result_ids: Callable[[bytes], Mapping[str, Any]] | None = None,
    now: float | None = None,
) -> Op[IdempotentOutcome]:
    """Replay the recorded answer, or `commit_mutation`: one transaction. Looking up inside
    the write makes concurrent retries safe: the writer serializes them, so `work` runs
    once per request_id."""

    def op(db: Database) -> IdempotentOutcome:
        replayed = replay_mutation(mutation)(db)
        if replayed is not None:
            return IdempotentOutcome(replayed, replayed=True)
        return IdempotentOutcome(commit_mutation(mutation, work, result_ids=result_ids, now=now)(db), replayed=False)

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
