"""Erasing a user: every row that names them or holds their text, in ONE transaction.

Deleted (not anonymised: a pseudonymised prompt still holds the person's words, and the
words are the personal data):
  * their prompts, with everything hanging off them: the completions, the rankings,
    demonstrations and comparison tasks of those prompts (whoever wrote them), the
    ratings of those completions, and any ranking that names one of those completions;
  * their own labeling work: rankings, demonstrations, ratings, comparison tasks, and
    the gold rankings they set as an operator;
  * every gold ranking of an erased prompt (so of its completions: a gold ranking names
    only completions of its own prompt);
  * their idempotency records, and other callers' records whose stored answer names an
    erased row (a leased task carries the prompt's text);
  * their API keys and their users row.
Audit rows are kept (who did what to the service stays accountable) with every mention
of the user replaced by ``sha256:<hex>`` of the id; the erasure itself is audited
(action ``user.erased``: who, when, the hash, row counts).

Erasing an id that nothing names any more answers the last erasure of that id again
(found by its hash in the audit), so a retry or a second call is a no-op; an id that
nothing names and that was never erased is NotFoundError.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlite_utils import Database

from common.store.errors import InvalidArgumentError, NotFoundError
from common.store.ops.base import Op, clock, to_json
from common.store.ops.idempotency import audit

ERASED_ACTION = "user.erased"
_HEX_ID = re.compile(r"[0-9a-f]{32}")  # new_id()
_HEX_ID_RUN = re.compile(rb"[0-9a-f]{32,}")


def user_id_sha256(user_id: str) -> str:
    """The one-way hash that stands for an erased user id (hex sha256 of its UTF-8)."""
    return hashlib.sha256(user_id.encode()).hexdigest()


@dataclass(frozen=True)
class Erasure:
    """What an erasure did (the first one, when replayed)."""

    user_id_sha256: str
    erased_at: float
    erased_by: str | None
    rows_deleted: dict[str, int] = field(default_factory=dict)  # table -> rows
    audit_rows_pseudonymised: int = 0


def erase_user(user_id: str, erased_by: str | None, now: float | None = None) -> Op[Erasure]:
    """Delete everything that names ``user_id`` (module docstring); audit it by hash."""

    def op(db: Database) -> Erasure:
        if not user_id:
            raise InvalidArgumentError("user_id is empty: name the user to erase")
        digest = user_id_sha256(user_id)
        if not user_is_named(db, user_id):
            previous = last_erasure(db, digest)
            if previous is None:
                raise NotFoundError(f"user {user_id!r} not found: no row names it and it was never erased")
            return previous
        at = clock(now)
        secure = db.execute("PRAGMA secure_delete").fetchone()[0]
        db.execute("PRAGMA secure_delete = ON")  # freed pages are zeroed, not left readable
        try:
            deleted = _delete_rows(db, user_id)
            hashed = _pseudonymise_audit(db, user_id, f"sha256:{digest}")
        finally:
            db.execute(f"PRAGMA secure_delete = {int(secure)}")
        erasure = Erasure(digest, at, erased_by, deleted, hashed)
        audit(erased_by, ERASED_ACTION, {"user_id_sha256": digest, "erased_by": erased_by, "rows_deleted": deleted,
                                         "audit_rows_pseudonymised": hashed}, now=at)(db)
        return erasure

    return op


def user_is_named(db: Database, user_id: str) -> bool:
    """Whether any row names ``user_id`` as a user, labeler, key owner or caller."""
    checks = (
        "SELECT 1 FROM users WHERE id = ?", "SELECT 1 FROM api_keys WHERE user_id = ?",
        "SELECT 1 FROM prompts WHERE user_id = ?", "SELECT 1 FROM rankings WHERE labeler_id = ?",
        "SELECT 1 FROM demonstrations WHERE labeler_id = ?", "SELECT 1 FROM ratings WHERE labeler_id = ?",
        "SELECT 1 FROM comparison_tasks WHERE labeler_id = ?", "SELECT 1 FROM idempotency WHERE caller_id = ?",
        "SELECT 1 FROM audit WHERE user_id = ?", "SELECT 1 FROM gold_rankings WHERE set_by = ?",
    )  # fmt: skip
    return any(db.execute(f"{sql} LIMIT 1", [user_id]).fetchone() for sql in checks)


def last_erasure(db: Database, digest: str) -> Erasure | None:
    """The latest recorded erasure of the user whose id hashes to ``digest``, or None."""
    row = db.execute(
        "SELECT at, user_id, detail_json FROM audit WHERE action = ? "
        "AND json_extract(detail_json, '$.user_id_sha256') = ? ORDER BY id DESC LIMIT 1",
        [ERASED_ACTION, digest],
    ).fetchone()
    if row is None:
        return None
    detail = json.loads(row[2])
    return Erasure(digest, row[0], row[1], dict(detail["rows_deleted"]), int(detail["audit_rows_pseudonymised"]))


def _delete_rows(db: Database, user_id: str) -> dict[str, int]:
    """Delete the user's rows, children before parents (foreign keys are on); counts by table."""
    ids: dict[str, set[str]] = {
        "prompts": _column(db, "SELECT id FROM prompts WHERE user_id = ?", [user_id]),
    }
    ids["completions"] = _ids_in(db, "SELECT id FROM completions WHERE prompt_id IN ({})", ids["prompts"])
    ids["comparison_tasks"] = (
        _column(db, "SELECT id FROM comparison_tasks WHERE labeler_id = ?", [user_id])
        | _ids_in(db, "SELECT id FROM comparison_tasks WHERE prompt_id IN ({})", ids["prompts"]))
    ids["rankings"] = (
        _column(db, "SELECT id FROM rankings WHERE labeler_id = ?", [user_id])
        | _ids_in(db, "SELECT id FROM rankings WHERE prompt_id IN ({})", ids["prompts"])
        | _ids_in(db, "SELECT id FROM rankings WHERE task_id IN ({})", ids["comparison_tasks"])
        | _rankings_naming(db, ids["completions"]))
    ids["demonstrations"] = (
        _column(db, "SELECT id FROM demonstrations WHERE labeler_id = ?", [user_id])
        | _ids_in(db, "SELECT id FROM demonstrations WHERE prompt_id IN ({})", ids["prompts"]))
    ids["ratings"] = (
        _column(db, "SELECT id FROM ratings WHERE labeler_id = ?", [user_id])
        | _ids_in(db, "SELECT id FROM ratings WHERE completion_id IN ({})", ids["completions"]))
    gold = (_column(db, "SELECT prompt_id FROM gold_rankings WHERE set_by = ?", [user_id])
            | _ids_in(db, "SELECT prompt_id FROM gold_rankings WHERE prompt_id IN ({})", ids["prompts"]))
    erased_ids = set().union(*ids.values())
    counts = {"gold_rankings": _delete_in(db, "gold_rankings", "prompt_id", gold)}
    for table in ("ratings", "rankings", "demonstrations", "comparison_tasks", "completions", "prompts"):
        counts[table] = _delete_in(db, table, "id", ids[table])
    counts["idempotency"] = (
        db.execute("DELETE FROM idempotency WHERE caller_id = ?", [user_id]).rowcount
        + _delete_answers_naming(db, erased_ids))
    counts["api_keys"] = db.execute("DELETE FROM api_keys WHERE user_id = ?", [user_id]).rowcount
    counts["users"] = db.execute("DELETE FROM users WHERE id = ?", [user_id]).rowcount
    return counts


def _column(db: Database, sql: str, params: list[Any]) -> set[str]:
    return {row[0] for row in db.execute(sql, params)}


def _chunks(ids: Iterable[str], size: int = 500) -> Iterable[list[str]]:
    batch: list[str] = []
    for value in ids:
        batch.append(value)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ids_in(db: Database, sql: str, ids: set[str]) -> set[str]:
    """``sql`` (one ``IN ({})``) over ``ids`` in chunks below SQLite's bound-variable limit."""
    found: set[str] = set()
    for chunk in _chunks(sorted(ids)):
        found |= _column(db, sql.format(", ".join("?" * len(chunk))), chunk)
    return found


def _delete_in(db: Database, table: str, column: str, ids: set[str]) -> int:
    deleted = 0
    for chunk in _chunks(sorted(ids)):
        deleted += db.execute(f"DELETE FROM {table} WHERE {column} IN ({', '.join('?' * len(chunk))})",
                              chunk).rowcount
    return deleted


def _rankings_naming(db: Database, completion_ids: set[str]) -> set[str]:
    """Rankings (of any prompt) whose groups name one of ``completion_ids``."""
    if not completion_ids:
        return set()
    return _ids_in(db, "SELECT DISTINCT r.id FROM rankings AS r, json_each(r.ranking_json) AS g, "
                       "json_each(g.value) AS c WHERE c.value IN ({})", completion_ids)


def _delete_answers_naming(db: Database, erased_ids: set[str]) -> int:
    """Delete other callers' idempotency records whose stored answer names an erased row
    (a leased task holds the prompt's text); a retry of one runs again and finds nothing."""
    if not erased_ids:
        return 0
    hex_ids = {i.encode() for i in erased_ids if _HEX_ID.fullmatch(i)}
    other_ids = [i.encode() for i in erased_ids if not _HEX_ID.fullmatch(i)]  # ids an import chose
    doomed = []
    for rowid, answer in db.execute("SELECT rowid, response FROM idempotency"):
        answer = bytes(answer)
        if _names_hex_id(answer, hex_ids) or any(i in answer for i in other_ids):
            doomed.append(rowid)
    for rowid in doomed:
        db.execute("DELETE FROM idempotency WHERE rowid = ?", [rowid])
    return len(doomed)


def _names_hex_id(blob: bytes, hex_ids: set[bytes]) -> bool:
    """Whether a 32-hex-character id of ``hex_ids`` occurs in ``blob`` (every occurrence lies
    inside a maximal run of hex characters: check each 32-wide window of each run)."""
    for run in _HEX_ID_RUN.finditer(blob):
        text = run.group()
        if any(text[i:i + 32] in hex_ids for i in range(len(text) - 31)):
            return True
    return False


def _pseudonymise_audit(db: Database, user_id: str, pseudonym: str) -> int:
    """Replace ``user_id`` by ``pseudonym`` in the audit: the user_id column, and every JSON
    string of detail_json that is the id or holds it as a whole token; rows changed."""
    quoted = json.dumps(user_id)[1:-1]  # as it appears inside detail_json (ensure_ascii)
    token = re.compile(rf"(?<![\w.@-]){re.escape(user_id)}(?![\w.@-])")
    rows = db.execute(
        "SELECT id, user_id, detail_json FROM audit WHERE user_id = ? OR instr(detail_json, ?) > 0 "
        "OR instr(detail_json, ?) > 0", [user_id, user_id, quoted]).fetchall()
    changed = 0
    for audit_id, who, detail_json in rows:
        detail = _replace_strings(json.loads(detail_json), user_id, pseudonym, token)
        new_who = pseudonym if who == user_id else who
        new_detail = to_json(detail)
        if new_who != who or new_detail != detail_json:
            db.execute("UPDATE audit SET user_id = ?, detail_json = ? WHERE id = ?", [new_who, new_detail, audit_id])
            changed += 1
    return changed


def _replace_strings(value: Any, user_id: str, pseudonym: str, token: re.Pattern[str]) -> Any:
    """``value`` (decoded JSON) with the id replaced in every string, keys included."""
    if isinstance(value, str):
        return pseudonym if value == user_id else token.sub(pseudonym, value)
    if isinstance(value, list):
        return [_replace_strings(v, user_id, pseudonym, token) for v in value]
    if isinstance(value, dict):
        return {_replace_strings(k, user_id, pseudonym, token): _replace_strings(v, user_id, pseudonym, token)
                for k, v in value.items()}
    return value
