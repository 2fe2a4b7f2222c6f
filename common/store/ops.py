"""Domain operations on the store, each a factory returning an `Op`.

An `Op[T]` is a function `(db: sqlite_utils.Database) -> T`. Nothing here touches a
connection when called: `add_prompt(...)` only builds the op, and the caller decides where
it runs:

    prompt = await store.write(add_prompt(user_id, "hi"))     # server (asyncio)
    prompt = store.write_sync(add_prompt(user_id, "hi"))      # trainer, CLI, threads
    policy = await store.read(serving_policy())               # reads likewise

Ops compose: calling `op(db)` inside another op joins its transaction, so several steps
commit or fail together, e.g. a generation's prompt and completions:

    def log_generation(db):
        prompt = add_prompt(user_id, text)(db)
        return prompt, add_completions(prompt.id, samples)(db)
    prompt, completions = await store.write(log_generation)

Ops that change rows must run through `write`/`write_sync`; read connections refuse them.
Ids are uuid4 hex unless a caller passes its own; `now` defaults to the clock at the
moment the op runs. Hot inserts use one plain INSERT statement rather than sqlite-utils'
`Table.insert`, which inspects the table on every call (about 50 µs against 4 µs), and the
single writer thread is the store's serial resource; queries and counts use sqlite-utils.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlite_utils import Database

from common.identity import ROLES, Role, split_for_user
from common.store.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    NotYourTaskError,
    StoreError,
    TaskClosedError,
)
from common.store.records import (
    CYCLE_TERMINAL_STATES,
    ApiKey,
    AuditEntry,
    ComparisonTask,
    Completion,
    Cycle,
    CycleState,
    Demonstration,
    FeedbackSource,
    IdempotentOutcome,
    IdempotentRecord,
    NewCompletion,
    Policy,
    PolicyStatus,
    Prompt,
    PromptSource,
    Ranking,
    Rating,
    Stats,
    User,
    from_row,
)
from common.text import normalize_text

T = TypeVar("T")
Op = Callable[[Database], T]

# Allowed state changes through update_cycle; queued → running only via claim_queued_cycle.
_CYCLE_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"skipped", "failed"}),
    "running": frozenset({"promoted", "rejected", "skipped", "failed"}),
}
_COUNTED_TABLES = (
    "users", "prompts", "completions", "rankings", "demonstrations", "ratings",
    "policies", "cycles",
)  # fmt: skip


# ---------------------------------------------------------------- small helpers


def new_id() -> str:
    """A fresh row id: uuid4 as 32 hex characters."""
    return uuid.uuid4().hex


def dedup_key(text: str) -> str:
    """The key under which near-identical prompts collide (``common.text.normalize_text``)."""
    return normalize_text(text)


def _clock(now: float | None) -> float:
    return time.time() if now is None else now


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _insert(db: Database, table: str, row: Mapping[str, Any]) -> None:
    """INSERT one row (names come from our own code, values are bound)."""
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    db.conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))


def _one(db: Database, sql: str, params: Sequence[Any]) -> dict[str, Any] | None:
    return next(iter(db.query(sql, params)), None)


def _get_or_raise(db: Database, cls: type[T], sql: str, key: Any, what: str) -> T:
    row = _one(db, sql, [key])
    if row is None:
        raise NotFoundError(f"{what} {key!r} not found")
    return from_row(cls, row)


# ---------------------------------------------------------------- users and keys


def add_user(
    user_id: str | None = None, labeler_group: str | None = None, now: float | None = None
) -> Op[User]:
    """Create a user (a fresh id unless given)."""

    def op(db: Database) -> User:
        row = {"id": user_id or new_id(), "created_at": _clock(now), "labeler_group": labeler_group}
        _insert(db, "users", row)
        return from_row(User, row)

    return op


def add_api_key(
    user_id: str,
    role: Role,
    key_hash: str,
    labeler_group: str | None = None,
    note: str = "",
    now: float | None = None,
) -> Op[ApiKey]:
    """Store a key by its hash (`identity.hash_api_key`), creating the user if new."""

    def op(db: Database) -> ApiKey:
        if role not in ROLES:
            raise InvalidArgumentError(f"Unknown role: {role!r}")
        at = _clock(now)
        db.conn.execute(
            "INSERT OR IGNORE INTO users (id, created_at, labeler_group) VALUES (?, ?, ?)",
            [user_id, at, labeler_group],
        )
        row = {
            "key_id": new_id(), "key_hash": key_hash, "user_id": user_id, "role": role,
            "labeler_group": labeler_group, "created_at": at, "revoked_at": None, "note": note,
        }  # fmt: skip
        _insert(db, "api_keys", row)
        return from_row(ApiKey, row)

    return op


def find_key_by_hash(key_hash: str) -> Op[ApiKey | None]:
    """The key with this hash, revoked or not (check `.active`), or None."""

    def op(db: Database) -> ApiKey | None:
        row = _one(db, "SELECT * FROM api_keys WHERE key_hash = ?", [key_hash])
        return None if row is None else from_row(ApiKey, row)

    return op


def revoke_key(key_id: str, now: float | None = None) -> Op[bool]:
    """Revoke a key; False when it does not exist or was already revoked."""

    def op(db: Database) -> bool:
        cursor = db.conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            [_clock(now), key_id],
        )
        return cursor.rowcount == 1

    return op


def list_keys(user_id: str | None = None, include_revoked: bool = True) -> Op[list[ApiKey]]:
    """Keys, oldest first, optionally of one user and/or only active ones."""

    def op(db: Database) -> list[ApiKey]:
        where, params = [], []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if not include_revoked:
            where.append("revoked_at IS NULL")
        rows = db.table("api_keys").rows_where(
            " AND ".join(where) or None, params, order_by="created_at, key_id"
        )
        return [from_row(ApiKey, row) for row in rows]

    return op


# ---------------------------------------------------------------- prompts and completions


def add_prompt(
    user_id: str,
    text: str,
    *,
    source: PromptSource = "traffic",
    messages: Sequence[Mapping[str, str]] | None = None,
    has_pii: bool = False,
    redacted_text: str | None = None,
    request_id: str | None = None,
    prompt_id: str | None = None,
    now: float | None = None,
) -> Op[Prompt]:
    """Log a prompt; its split is `identity.split_for_user(user_id)`, its dedup key
    `dedup_key(text)`."""

    def op(db: Database) -> Prompt:
        row = {
            "id": prompt_id or new_id(), "user_id": user_id, "text": text,
            "messages_json": None if messages is None else _json([dict(m) for m in messages]),
            "source": source, "split": split_for_user(user_id), "dedup_key": dedup_key(text),
            "has_pii": int(has_pii), "redacted_text": redacted_text,
            "request_id": request_id, "created_at": _clock(now),
        }  # fmt: skip
        _insert(db, "prompts", row)
        return from_row(Prompt, row)

    return op


def get_prompt(prompt_id: str) -> Op[Prompt | None]:
    """The prompt, or None."""

    def op(db: Database) -> Prompt | None:
        row = _one(db, "SELECT * FROM prompts WHERE id = ?", [prompt_id])
        return None if row is None else from_row(Prompt, row)

    return op


def add_completions(
    prompt_id: str, completions: Iterable[NewCompletion], now: float | None = None
) -> Op[list[Completion]]:
    """Log samples of a prompt (the prompt must exist: foreign key)."""
    samples = list(completions)

    def op(db: Database) -> list[Completion]:
        at = _clock(now)
        stored = []
        for s in samples:
            row = {
                "id": s.id or new_id(), "prompt_id": prompt_id, "idx": s.idx,
                "policy_version": s.policy_version, "text": s.text,
                "finish_reason": s.finish_reason, "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens, "sampling_json": _json(s.sampling),
                "latency_s": s.latency_s, "ttft_s": s.ttft_s, "purpose": s.purpose,
                "created_at": at,
            }  # fmt: skip
            _insert(db, "completions", row)
            stored.append(from_row(Completion, row))
        return stored

    return op


def get_completions(prompt_id: str) -> Op[list[Completion]]:
    """A prompt's completions in logging order (then by index)."""

    def op(db: Database) -> list[Completion]:
        rows = db.table("completions").rows_where(
            "prompt_id = ?", [prompt_id], order_by="created_at, idx, id"
        )
        return [from_row(Completion, row) for row in rows]

    return op


def get_completion(completion_id: str) -> Op[Completion | None]:
    """One completion, or None."""

    def op(db: Database) -> Completion | None:
        row = _one(db, "SELECT * FROM completions WHERE id = ?", [completion_id])
        return None if row is None else from_row(Completion, row)

    return op


def _check_completions_of_prompt(db: Database, prompt_id: str, completion_ids: Sequence[str]) -> None:
    """Raise unless the prompt exists and every id is one of its logged completions (the
    first wrong id is named, with the prompt it belongs to)."""
    if db.conn.execute("SELECT 1 FROM prompts WHERE id = ?", [prompt_id]).fetchone() is None:
        raise NotFoundError(f"prompt {prompt_id!r} not found")
    marks = ",".join("?" * len(completion_ids))
    owner = dict(db.conn.execute(
        f"SELECT id, prompt_id FROM completions WHERE id IN ({marks})", list(completion_ids)).fetchall())  # fmt: skip
    for cid in completion_ids:
        if cid not in owner:
            raise InvalidArgumentError(f"completion {cid!r} not found")
        if owner[cid] != prompt_id:
            raise InvalidArgumentError(f"completion {cid!r} belongs to prompt {owner[cid]!r}, not {prompt_id!r}")


# ---------------------------------------------------------------- labeling queue
#
# A prompt is given to one labeler at a time: a `comparison_tasks` row leases K of its
# completions to the labeler until `expires_at`. Feedback.NextComparison picks prompts with
# a READ (`pick_prompts`), claims one in a short write (`prompt_is_free`, `lease_task`
# without completions yet), samples, then fills the task in (`set_task_completions`) or,
# when sampling fails, releases it (`release_task`). SubmitRanking answers it
# (`add_ranking` with a task_id).


def pick_prompts(labeler_id: str, now: float, limit: int) -> Op[list[Prompt]]:
    """Up to `limit` prompts this labeler may be given now, freshest first: train- or
    val-split prompts with the fewest rankings, then the newest; never one the labeler
    ranked, one under a live lease, or one flagged as PII and never redacted. A READ: it
    scans the prompts, so it must not hold the single writer."""

    def op(db: Database) -> list[Prompt]:
        rows = db.query(
            """
            SELECT p.* FROM prompts p
            LEFT JOIN (SELECT prompt_id, COUNT(*) AS n FROM rankings GROUP BY prompt_id) r
                   ON r.prompt_id = p.id
            WHERE p.split IN ('train', 'val')
              AND (p.has_pii = 0 OR p.redacted_text IS NOT NULL)
              AND p.id NOT IN (SELECT prompt_id FROM rankings WHERE labeler_id = ?)
              AND p.id NOT IN (SELECT prompt_id FROM comparison_tasks
                               WHERE status = 'leased' AND expires_at > ?)
            ORDER BY COALESCE(r.n, 0), p.created_at DESC, p.id
            LIMIT ?
            """, [labeler_id, now, limit])  # fmt: skip
        return [from_row(Prompt, row) for row in rows]

    return op


def prompt_is_free(prompt_id: str, labeler_id: str, now: float) -> Op[bool]:
    """Inside a claim's write: nobody holds a live lease on the prompt and this labeler did
    not rank it since `pick_prompts` picked it (two indexed lookups)."""

    def op(db: Database) -> bool:
        leased = db.conn.execute(
            "SELECT 1 FROM comparison_tasks WHERE status = 'leased' AND expires_at > ? AND prompt_id = ?",
            [now, prompt_id]).fetchone()  # fmt: skip
        ranked = db.conn.execute(
            "SELECT 1 FROM rankings WHERE prompt_id = ? AND labeler_id = ?", [prompt_id, labeler_id]).fetchone()  # fmt: skip
        return leased is None and ranked is None

    return op


def reusable_completions(prompt_id: str, k: int, version: int) -> Op[list[str] | None]:
    """The completion ids of the newest expired task of this prompt with K = k whose
    completions all come from policy `version`, or None."""

    def op(db: Database) -> list[str] | None:
        for row in db.query(
            "SELECT completion_ids_json FROM comparison_tasks "
            "WHERE prompt_id = ? AND status = 'expired' AND k = ? ORDER BY created_at DESC LIMIT 5",
            [prompt_id, k],
        ):
            ids = json.loads(row["completion_ids_json"])
            if len(ids) != k:
                continue
            marks = ",".join("?" * k)
            versions = {r["policy_version"] for r in db.query(
                f"SELECT policy_version FROM completions WHERE id IN ({marks})", ids)}  # fmt: skip
            if versions == {version}:
                return ids
        return None

    return op


def lease_task(
    prompt_id: str,
    labeler_id: str,
    completion_ids: Sequence[str],
    lease_s: float,
    *,
    k: int | None = None,
    task_id: str | None = None,
    now: float | None = None,
) -> Op[ComparisonTask]:
    """Lease `completion_ids` of a prompt to a labeler for `lease_s` seconds.

    With no ids yet (give `k`), the task claims the prompt while its K completions are
    sampled: no one else is given the prompt, but the task cannot be answered until
    `set_task_completions` fills it in."""
    ids = list(completion_ids)

    def op(db: Database) -> ComparisonTask:
        if ids:
            if len(set(ids)) != len(ids) or len(ids) < 2 or k not in (None, len(ids)):
                raise InvalidArgumentError(f"a task needs 2 or more distinct completions (k = {k}): {ids}")
            _check_completions_of_prompt(db, prompt_id, ids)
        elif k is None:
            raise InvalidArgumentError("a task whose completions are still to be sampled needs its k")
        at = _clock(now)
        row = {
            "id": task_id or new_id(), "prompt_id": prompt_id, "labeler_id": labeler_id,
            "k": len(ids) or k, "completion_ids_json": _json(ids), "status": "leased",
            "created_at": at, "expires_at": at + lease_s,
        }  # fmt: skip
        _insert(db, "comparison_tasks", row)
        return from_row(ComparisonTask, row)

    return op


def set_task_completions(task_id: str, completion_ids: Sequence[str], expires_at: float) -> Op[None]:
    """Fill in the completions of a task leased without them; its lease now runs until
    `expires_at` (the time spent sampling is not the labeler's)."""
    ids = list(completion_ids)

    def op(db: Database) -> None:
        db.conn.execute(
            "UPDATE comparison_tasks SET completion_ids_json = ?, expires_at = ? WHERE id = ?",
            [_json(ids), expires_at, task_id])  # fmt: skip

    return op


def release_task(task_id: str, now: float | None = None) -> Op[None]:
    """End a lease at once (its completions never reached the labeler): the prompt is free."""

    def op(db: Database) -> None:
        db.conn.execute(
            "UPDATE comparison_tasks SET status = 'expired', expires_at = ? WHERE id = ?", [_clock(now), task_id])

    return op


def get_task(task_id: str) -> Op[ComparisonTask | None]:
    """The task as stored (see `ComparisonTask.is_live`), or None."""

    def op(db: Database) -> ComparisonTask | None:
        row = _one(db, "SELECT * FROM comparison_tasks WHERE id = ?", [task_id])
        return None if row is None else from_row(ComparisonTask, row)

    return op


def expire_tasks(now: float | None = None) -> Op[int]:
    """Mark leases past their expiry as expired; return how many."""

    def op(db: Database) -> int:
        cursor = db.conn.execute(
            "UPDATE comparison_tasks SET status = 'expired' "
            "WHERE status = 'leased' AND expires_at <= ?",
            [_clock(now)],
        )
        return cursor.rowcount

    return op


def _answer_task(db: Database, task_id: str, labeler_id: str, ids: list[str], prompt_id: str, at: float) -> str:
    """Mark a task submitted, or raise why this labeler may not answer it with `ids`
    (exactly its completions; `prompt_id`, when given, must be its prompt); return the
    task's prompt id.

    SubmitRanking's hot path: when the task is this labeler's live lease, ONE statement
    claims it and returns what the ids are checked against (a refusal below rolls the op
    back). Any other task gets `_task_refusal`, the full checks in their usual order."""
    row = db.conn.execute(
        "UPDATE comparison_tasks SET status = 'submitted' "
        "WHERE id = ? AND labeler_id = ? AND status = 'leased' AND expires_at > ? "
        "RETURNING prompt_id, completion_ids_json",
        [task_id, labeler_id, at]).fetchone()  # fmt: skip
    if row is None:
        raise _task_refusal(db, task_id, labeler_id, prompt_id)
    task_prompt, completion_ids_json = row
    if prompt_id and prompt_id != task_prompt:
        raise InvalidArgumentError(f"prompt_id {prompt_id!r} is not the prompt of task {task_id!r} ({task_prompt!r})")
    own = json.loads(completion_ids_json)
    if not own:
        raise TaskClosedError(f"task {task_id!r} is still being prepared")
    own_set, ranked = set(own), set(ids)
    foreign = [cid for cid in ids if cid not in own_set]
    if foreign:
        raise InvalidArgumentError(f"completion {foreign[0]!r} is not one of task {task_id!r}'s completions")
    missing = [cid for cid in own if cid not in ranked]
    if missing:
        raise InvalidArgumentError(
            f"completion {missing[0]!r} of task {task_id!r} is missing from the ranking: rank all {len(own)}")
    return task_prompt


def _task_refusal(db: Database, task_id: str, labeler_id: str, prompt_id: str) -> StoreError:
    """Why a task that is not this labeler's live lease cannot be answered."""
    row = db.conn.execute(
        "SELECT prompt_id, labeler_id, status, expires_at FROM comparison_tasks WHERE id = ?", [task_id]).fetchone()  # fmt: skip
    if row is None:
        return NotFoundError(f"task {task_id!r} not found")
    task_prompt, owner, status, expires_at = row
    if owner != labeler_id:
        return NotYourTaskError(f"task {task_id!r} is leased to another labeler")
    if prompt_id and prompt_id != task_prompt:
        return InvalidArgumentError(f"prompt_id {prompt_id!r} is not the prompt of task {task_id!r} ({task_prompt!r})")
    if status == "submitted":
        return TaskClosedError(f"task {task_id!r} was already answered")
    expired_at = datetime.fromtimestamp(expires_at, timezone.utc).isoformat(timespec="seconds")
    return TaskClosedError(f"task {task_id!r} expired at {expired_at}: ask NextComparison for a new task")


# ---------------------------------------------------------------- feedback


def _check_ranking_shape(groups: list[list[str]]) -> list[str]:
    """Raise unless every group holds ids and no id is named twice; return the ids."""
    ids = [c for group in groups for c in group]
    if not groups or any(not group for group in groups):
        raise InvalidArgumentError("a ranking group is empty")
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError(f"a completion appears twice in the ranking: {ids}")
    return ids


def _check_not_all_tied(groups: list[list[str]]) -> None:
    if len(groups) < 2:
        raise InvalidArgumentError("a ranking needs at least two groups (all tied says nothing)")


def add_ranking(
    prompt_id: str,
    labeler_id: str,
    ranking: Sequence[Sequence[str]],
    *,
    labeler_group: str | None = None,
    task_id: str | None = None,
    source: FeedbackSource = "label",
    check_groups: Callable[[list[list[str]]], None] = _check_not_all_tied,
    now: float | None = None,
) -> Op[Ranking]:
    """Store a ranking (groups best first, ties within a group) of a prompt's completions.

    Checked in this order, so that the first problem is the one named: the groups' shape;
    the ids, against the task (`task_id`: this labeler's live lease, which the ranking
    must order exactly and now answers; `prompt_id` may then be "")
    or else against the prompt's completions; last `check_groups`, the caller's rules on K
    and ties (by default: not all tied), so a wrong id is named rather than a wrong K."""
    groups = [list(group) for group in ranking]

    def op(db: Database) -> Ranking:
        at = _clock(now)
        ids = _check_ranking_shape(groups)
        if task_id is not None:
            ranked_prompt = _answer_task(db, task_id, labeler_id, ids, prompt_id, at)
        else:
            _check_completions_of_prompt(db, prompt_id, ids)
            ranked_prompt = prompt_id
        check_groups(groups)
        row = {
            "id": new_id(), "prompt_id": ranked_prompt, "labeler_id": labeler_id,
            "labeler_group": labeler_group, "task_id": task_id, "ranking_json": _json(groups),
            "k": len(ids), "source": source, "created_at": at,
        }  # fmt: skip
        _insert(db, "rankings", row)
        return from_row(Ranking, row)

    return op


def add_demonstration(
    prompt_id: str,
    labeler_id: str,
    response: str,
    *,
    labeler_group: str | None = None,
    source: FeedbackSource = "label",
    now: float | None = None,
) -> Op[Demonstration]:
    """Store the response a labeler wants for a prompt (the prompt must exist)."""

    def op(db: Database) -> Demonstration:
        row = {
            "id": new_id(), "prompt_id": prompt_id, "labeler_id": labeler_id,
            "labeler_group": labeler_group, "response": response, "source": source,
            "created_at": _clock(now),
        }  # fmt: skip
        _insert(db, "demonstrations", row)
        return from_row(Demonstration, row)

    return op


def add_rating(
    completion_id: str,
    labeler_id: str,
    overall: int,
    flags: Mapping[str, bool] | None = None,
    *,
    comment: str = "",
    labeler_group: str | None = None,
    now: float | None = None,
) -> Op[Rating]:
    """Store a Likert 1..7 rating and metadata flags of a completion."""

    def op(db: Database) -> Rating:
        row = {
            "id": new_id(), "completion_id": completion_id, "labeler_id": labeler_id,
            "labeler_group": labeler_group, "overall": overall,
            "flags_json": _json({k: bool(v) for k, v in (flags or {}).items()}),
            "comment": comment, "created_at": _clock(now),
        }  # fmt: skip
        _insert(db, "ratings", row)
        return from_row(Rating, row)

    return op


# ---------------------------------------------------------------- policies


def _policy_or_raise(db: Database, version: int) -> Policy:
    return _get_or_raise(db, Policy, "SELECT * FROM policies WHERE version = ?", version, "policy")


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
        at = _clock(now)
        row = {
            "version": version, "path": path, "parent_version": parent_version,
            "status": "candidate" if status == "serving" else status, "created_at": at,
            "cycle_id": cycle_id, "metrics_json": _json(dict(metrics or {})),
            "serving_since": None,
        }  # fmt: skip
        _insert(db, "policies", row)
        if status == "serving":
            _make_serving(db, version, at)
        return _policy_or_raise(db, version)

    return op


def set_policy_status(version: int, status: PolicyStatus, now: float | None = None) -> Op[Policy]:
    """Change a policy's status; "serving" retires the one serving before, atomically."""

    def op(db: Database) -> Policy:
        _policy_or_raise(db, version)
        if status == "serving":
            _make_serving(db, version, _clock(now))
        else:
            db.conn.execute("UPDATE policies SET status = ? WHERE version = ?", [status, version])
        return _policy_or_raise(db, version)

    return op


def serving_policy() -> Op[Policy | None]:
    """The policy serving now, or None."""

    def op(db: Database) -> Policy | None:
        row = _one(db, "SELECT * FROM policies WHERE status = 'serving'", [])
        return None if row is None else from_row(Policy, row)

    return op


def previous_serving_policy() -> Op[Policy | None]:
    """The policy that served before the current one (rollback's default), or None."""

    def op(db: Database) -> Policy | None:
        row = _one(
            db,
            "SELECT * FROM policies WHERE status != 'serving' AND serving_since IS NOT NULL "
            "ORDER BY serving_since DESC LIMIT 1",
            [],
        )
        return None if row is None else from_row(Policy, row)

    return op


def get_policy(version: int) -> Op[Policy | None]:
    """One policy, or None."""

    def op(db: Database) -> Policy | None:
        row = _one(db, "SELECT * FROM policies WHERE version = ?", [version])
        return None if row is None else from_row(Policy, row)

    return op


def list_policies(limit: int = 0) -> Op[list[Policy]]:
    """Policies, newest version first; `limit` 0 means all."""

    def op(db: Database) -> list[Policy]:
        rows = db.table("policies").rows_where(order_by="version DESC", limit=limit or None)
        return [from_row(Policy, row) for row in rows]

    return op


# ---------------------------------------------------------------- cycles


def _cycle_or_raise(db: Database, cycle_id: int) -> Cycle:
    return _get_or_raise(db, Cycle, "SELECT * FROM cycles WHERE id = ?", cycle_id, "cycle")


def create_cycle(
    trigger: str, reason: str = "", base_version: int | None = None, now: float | None = None
) -> Op[Cycle]:
    """Queue a cycle (`trigger`: "schedule", "admin" or "cli")."""

    def op(db: Database) -> Cycle:
        cursor = db.conn.execute(
            "INSERT INTO cycles (state, trigger, reason, created_at, base_version) "
            "VALUES ('queued', ?, ?, ?, ?)",
            [trigger, reason, _clock(now), base_version],
        )
        return _cycle_or_raise(db, int(cursor.lastrowid or 0))

    return op


def claim_queued_cycle(owner_pid: int | None = None, now: float | None = None) -> Op[Cycle | None]:
    """Start the oldest queued cycle, unless one is running; None when nothing was claimed.

    One UPDATE does it, and the `cycles_one_running` unique index backs it, so two
    trainers (even in two processes) can never both run a cycle.
    """

    def op(db: Database) -> Cycle | None:
        at = _clock(now)
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
        at = _clock(now)
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
            changes["metrics_json"] = _json({**cycle.metrics, **stage_metrics})
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
        at = _clock(now)
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

    def op(db: Database) -> Cycle | None:
        row = _one(db, "SELECT * FROM cycles WHERE id = ?", [cycle_id])
        return None if row is None else from_row(Cycle, row)

    return op


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


# ---------------------------------------------------------------- idempotency and audit


def lookup_idempotent(caller_id: str, method: str, request_id: str) -> Op[IdempotentRecord | None]:
    """The recorded answer to this (caller, method, request_id), or None."""

    def op(db: Database) -> IdempotentRecord | None:
        row = _one(
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
            "created_at": _clock(now),
        }  # fmt: skip
        _insert(db, "idempotency", row)
        return from_row(IdempotentRecord, row)

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
            [_clock(now), user_id, action, _json(dict(detail or {}))],
        )
        return int(cursor.lastrowid or 0)

    return op


def list_audit(limit: int = 100) -> Op[list[AuditEntry]]:
    """Audit entries, newest first."""

    def op(db: Database) -> list[AuditEntry]:
        rows = db.table("audit").rows_where(order_by="id DESC", limit=limit or None)
        return [from_row(AuditEntry, row) for row in rows]

    return op


# ---------------------------------------------------------------- stats


def stats() -> Op[Stats]:
    """Row counts, prompts per split and the serving version (Admin.GetStats)."""

    def op(db: Database) -> Stats:
        counts = {name: db.table(name).count for name in _COUNTED_TABLES}
        by_split = {s: 0 for s in ("train", "val", "test")}
        for row in db.query("SELECT split, COUNT(*) AS n FROM prompts GROUP BY split"):
            by_split[row["split"]] = row["n"]
        serving = serving_policy()(db)
        return Stats(
            serving_version=None if serving is None else serving.version,
            prompts_by_split=by_split,
            **counts,
        )

    return op
