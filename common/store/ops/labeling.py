"""Labeling: the queue of ranking tasks (lease, claim, answer, expire) and the
feedback labelers give (rankings, demonstrations, ratings).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone

from sqlite_utils import Database

from common.store.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotYourTaskError,
    StoreError,
    TaskClosedError,
)
from common.store.ops.base import Op, clock, get_one, insert_record, new_id, to_json
from common.store.ops.prompts import check_completions_of_prompt
from common.store.rankings import check_not_all_tied, check_ranking_shape
from common.store.records import (
    ComparisonTask,
    Demonstration,
    FeedbackSource,
    Prompt,
    Ranking,
    Rating,
    from_row,
)

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
    """Inside a claim's write: the prompt still exists (retention or an erasure may have
    deleted it since `pick_prompts` read it, outside this write), nobody holds a live lease
    on it and this labeler did not rank it since (three indexed lookups)."""

    def op(db: Database) -> bool:
        if db.conn.execute("SELECT 1 FROM prompts WHERE id = ?", [prompt_id]).fetchone() is None:
            return False
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
            check_completions_of_prompt(db, prompt_id, ids)
        elif k is None:
            raise InvalidArgumentError("a task whose completions are still to be sampled needs its k")
        at = clock(now)
        row = {
            "id": task_id or new_id(), "prompt_id": prompt_id, "labeler_id": labeler_id,
            "k": len(ids) or k, "completion_ids_json": to_json(ids), "status": "leased",
            "created_at": at, "expires_at": at + lease_s,
        }  # fmt: skip
        return insert_record(db, "comparison_tasks", ComparisonTask, row)

    return op


def set_task_completions(task_id: str, completion_ids: Sequence[str], expires_at: float) -> Op[None]:
    """Fill in the completions of a task leased without them; its lease now runs until
    `expires_at` (the time spent sampling is not the labeler's)."""
    ids = list(completion_ids)

    def op(db: Database) -> None:
        db.conn.execute(
            "UPDATE comparison_tasks SET completion_ids_json = ?, expires_at = ? WHERE id = ?",
            [to_json(ids), expires_at, task_id])  # fmt: skip

    return op


def release_task(task_id: str, now: float | None = None) -> Op[None]:
    """End a lease at once (its completions never reached the labeler): the prompt is free."""

    def op(db: Database) -> None:
        db.conn.execute(
            "UPDATE comparison_tasks SET status = 'expired', expires_at = ? WHERE id = ?", [clock(now), task_id])

    return op


def get_task(task_id: str) -> Op[ComparisonTask | None]:
    """The task as stored (see `ComparisonTask.is_live`), or None."""
    return get_one(ComparisonTask, "comparison_tasks", "id", task_id)


def expire_tasks(now: float | None = None) -> Op[int]:
    """Mark leases past their expiry as expired; return how many."""

    def op(db: Database) -> int:
        cursor = db.conn.execute(
            "UPDATE comparison_tasks SET status = 'expired' "
            "WHERE status = 'leased' AND expires_at <= ?",
            [clock(now)],
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


def add_ranking(
    prompt_id: str,
    labeler_id: str,
    ranking: Sequence[Sequence[str]],
    *,
    labeler_group: str | None = None,
    task_id: str | None = None,
    source: FeedbackSource = "label",
    check_groups: Callable[[list[list[str]]], None] = check_not_all_tied,
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
        at = clock(now)
        ids = check_ranking_shape(groups)
        if task_id is not None:
            ranked_prompt = _answer_task(db, task_id, labeler_id, ids, prompt_id, at)
        else:
            check_completions_of_prompt(db, prompt_id, ids)
            ranked_prompt = prompt_id
        check_groups(groups)
        row = {
            "id": new_id(), "prompt_id": ranked_prompt, "labeler_id": labeler_id,
            "labeler_group": labeler_group, "task_id": task_id, "ranking_json": to_json(groups),
            "k": len(ids), "source": source, "created_at": at,
        }  # fmt: skip
        return insert_record(db, "rankings", Ranking, row)

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
            "created_at": clock(now),
        }  # fmt: skip
        return insert_record(db, "demonstrations", Demonstration, row)

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
            "flags_json": to_json({k: bool(v) for k, v in (flags or {}).items()}),
            "comment": comment, "created_at": clock(now),
        }  # fmt: skip
        return insert_record(db, "ratings", Rating, row)

    return op
