"""Labeling: the queue of ranking tasks (lease, claim, answer, expire) and the
feedback labelers give (rankings, demonstrations, ratings).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone

from sqlite_utils import Database

from common.identity import unit_interval_hash
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
    DECLINE_REASONS,
    ComparisonTask,
    DeclineReason,
    Demonstration,
    FeedbackSource,
    LabelerDay,
    Prompt,
    Ranking,
    Rating,
    from_row,
)

# ---------------------------------------------------------------- labeling queue
#
# A prompt is given to one labeler at a time: a `comparison_tasks` row leases K of its
# completions to the labeler until `expires_at`. Feedback.NextComparison picks prompts with
# a READ (`pick_prompts`, or `pick_gold_prompts` for a gold task), claims one in a short
# write (`prompt_is_free`, `lease_task` without completions yet, or with the completions it
# reuses: `gold_completions`, `shared_completions`, `reusable_completions`), samples, then
# fills the task in (`set_task_completions`) or, when sampling fails, releases it
# (`release_task`). SubmitRanking answers it (`add_ranking` with a task_id); DeclineTask
# closes it unranked (`decline_task`).
#
# Shared prompts (labeler agreement): `rlhf_unit_hash(prompt id)` (sha256 mapped to [0, 1),
# a SQL function every store connection has) below the overlap share marks a prompt whose
# first submitted completion set is given to `overlap_labelers` different labelers.

# The prompts a labeler may be given (`p`): train or val split (test prompts are never
# shown), not flagged as PII unless redacted, not ranked or declined by this labeler, no
# live lease on it. Named parameters :labeler and :now. pick_prompts, pick_gold_prompts and
# the queue count of labeler_day all read this one rule.
_OFFERABLE = """
    p.split IN ('train', 'val')
    AND (p.has_pii = 0 OR p.redacted_text IS NOT NULL)
    AND p.id NOT IN (SELECT prompt_id FROM rankings WHERE labeler_id = :labeler)
    AND p.id NOT IN (SELECT prompt_id FROM comparison_tasks WHERE labeler_id = :labeler AND status = 'declined')
    AND p.id NOT IN (SELECT prompt_id FROM comparison_tasks WHERE status = 'leased' AND expires_at > :now)
"""
QUEUE_COUNT_CAP = 10_000  # labeler_day counts the waiting prompts up to this many


def pick_prompts(labeler_id: str, now: float, limit: int, *, k: int | None = None, overlap_share: float = 0.0,
                 overlap_labelers: int = 2) -> Op[list[Prompt]]:  # fmt: skip
    """Up to `limit` prompts this labeler may be given now (`_OFFERABLE`). First the shared
    prompts (`overlap_share`) whose first submitted task, of K = `k`, fewer than
    `overlap_labelers` labelers ranked, oldest first; then the freshest: the fewest
    rankings, then the newest. A READ: it scans the prompts, so it must not hold the
    single writer."""
    params = {"labeler": labeler_id, "now": now, "limit": limit}

    def op(db: Database) -> list[Prompt]:
        shared = []
        if overlap_share > 0 and k is not None:
            shared = [from_row(Prompt, row) for row in db.query(
                f"""
                WITH first_sets AS (  -- the bare columns come from each prompt's earliest submitted task
                    SELECT prompt_id, k, completion_ids_json, MIN(created_at) AS first_at
                    FROM comparison_tasks WHERE status = 'submitted' GROUP BY prompt_id
                )
                SELECT p.* FROM first_sets f JOIN prompts p ON p.id = f.prompt_id
                WHERE rlhf_unit_hash(f.prompt_id) < :share AND f.k = :k
                  AND (SELECT COUNT(DISTINCT t.labeler_id) FROM comparison_tasks t
                       WHERE t.prompt_id = f.prompt_id AND t.status = 'submitted'
                         AND t.completion_ids_json = f.completion_ids_json) < :labelers
                  AND {_OFFERABLE}
                ORDER BY f.first_at, p.id
                LIMIT :limit
                """, {**params, "share": overlap_share, "k": k, "labelers": overlap_labelers})]  # fmt: skip
        if len(shared) >= limit:
            return shared
        taken = {p.id for p in shared}
        rows = db.query(
            f"""
            SELECT p.* FROM prompts p
            LEFT JOIN (SELECT prompt_id, COUNT(*) AS n FROM rankings GROUP BY prompt_id) r
                   ON r.prompt_id = p.id
            WHERE {_OFFERABLE}
            ORDER BY COALESCE(r.n, 0), p.created_at DESC, p.id
            LIMIT :limit
            """, params)  # fmt: skip
        return (shared + [from_row(Prompt, row) for row in rows if row["id"] not in taken])[:limit]

    return op


def pick_gold_prompts(labeler_id: str, now: float, k: int, limit: int) -> Op[list[Prompt]]:
    """Up to `limit` prompts with a gold ranking of `k` completions this labeler may be
    given now (`_OFFERABLE`: never one they ranked or declined, or one someone leases),
    oldest gold first. A READ, like pick_prompts."""

    def op(db: Database) -> list[Prompt]:
        rows = db.query(
            f"""
            SELECT p.* FROM gold_rankings g JOIN prompts p ON p.id = g.prompt_id
            WHERE json_array_length(g.completion_ids_json) = :k AND {_OFFERABLE}
            ORDER BY g.created_at, g.prompt_id
            LIMIT :limit
            """, {"labeler": labeler_id, "now": now, "k": k, "limit": limit})  # fmt: skip
        return [from_row(Prompt, row) for row in rows]

    return op


def prompt_is_free(prompt_id: str, labeler_id: str, now: float) -> Op[bool]:
    """Inside a claim's write: the prompt still exists (retention or an erasure may have
    deleted it since `pick_prompts` read it, outside this write), nobody holds a live lease
    on it and this labeler did not rank or decline it since (four indexed lookups)."""

    def op(db: Database) -> bool:
        if db.conn.execute("SELECT 1 FROM prompts WHERE id = ?", [prompt_id]).fetchone() is None:
            return False
        leased = db.conn.execute(
            "SELECT 1 FROM comparison_tasks WHERE status = 'leased' AND expires_at > ? AND prompt_id = ?",
            [now, prompt_id]).fetchone()  # fmt: skip
        ranked = db.conn.execute(
            "SELECT 1 FROM rankings WHERE prompt_id = ? AND labeler_id = ?", [prompt_id, labeler_id]).fetchone()  # fmt: skip
        declined = db.conn.execute(
            "SELECT 1 FROM comparison_tasks WHERE labeler_id = ? AND prompt_id = ? AND status = 'declined'",
            [labeler_id, prompt_id]).fetchone()  # fmt: skip
        return leased is None and ranked is None and declined is None

    return op


def gold_completions(prompt_id: str, k: int) -> Op[list[str] | None]:
    """Inside a claim's write: the completion ids of the prompt's gold ranking when it holds
    `k` of them (it may have been replaced or erased since the pick read it), else None."""

    def op(db: Database) -> list[str] | None:
        row = db.conn.execute("SELECT completion_ids_json FROM gold_rankings WHERE prompt_id = ?", [prompt_id]).fetchone()
        ids = json.loads(row[0]) if row else None
        return ids if ids is not None and len(ids) == k else None

    return op


def shared_completions(prompt_id: str, k: int, share: float, labelers: int) -> Op[list[str] | None]:
    """Inside a claim's write: for a shared prompt (`rlhf_unit_hash(prompt_id) < share`),
    the completion ids of its first submitted task when that task holds `k` and fewer than
    `labelers` labelers ranked that set; else None (sample or reuse as usual)."""

    def op(db: Database) -> list[str] | None:
        if unit_interval_hash(prompt_id) >= share:
            return None
        row = db.conn.execute(
            "SELECT completion_ids_json FROM comparison_tasks WHERE prompt_id = ? AND status = 'submitted' "
            "ORDER BY created_at LIMIT 1", [prompt_id]).fetchone()  # fmt: skip
        if row is None or len(ids := json.loads(row[0])) != k:
            return None
        ranked_by = db.conn.execute(
            "SELECT COUNT(DISTINCT labeler_id) FROM comparison_tasks "
            "WHERE prompt_id = ? AND status = 'submitted' AND completion_ids_json = ?", [prompt_id, row[0]]).fetchone()[0]  # fmt: skip
        return ids if ranked_by < labelers else None

    return op


def reusable_completions(prompt_id: str, k: int, version: int) -> Op[list[str] | None]:
    """The completion ids of the newest expired task of this prompt with K = k whose
    completions all come from policy `version` (every token of each: a completion that
    spans a hot swap is not one version's sample), or None."""

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
            versions = {r["policy_version"] if r["version_spans_json"] is None else None for r in db.query(
                f"SELECT policy_version, version_spans_json FROM completions WHERE id IN ({marks})", ids)}  # fmt: skip
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
            "created_at": at, "expires_at": at + lease_s, "shown_at": at if ids else None,
        }  # fmt: skip
        return insert_record(db, "comparison_tasks", ComparisonTask, row)

    return op


def set_task_completions(task_id: str, completion_ids: Sequence[str], expires_at: float,
                         shown_at: float | None = None) -> Op[None]:  # fmt: skip
    """Fill in the completions of a task leased without them (or reused); its lease now
    runs until `expires_at` and they reach the labeler at `shown_at` (default now): the
    time spent sampling is not the labeler's, neither in the lease nor in time per task."""
    ids = list(completion_ids)

    def op(db: Database) -> None:
        db.conn.execute(
            "UPDATE comparison_tasks SET completion_ids_json = ?, expires_at = ?, shown_at = ? WHERE id = ?",
            [to_json(ids), expires_at, clock(shown_at), task_id])  # fmt: skip

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


# SubmitRanking is the hot path (one call per ranking, all through the single writer):
# its checks are plain conn.execute calls, one query each (sqlite-utils' query() and the
# records' from_row cost more than the SQL itself at this size).
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
    if status == "declined":
        return TaskClosedError(f"task {task_id!r} was already declined")
    expired_at = datetime.fromtimestamp(expires_at, timezone.utc).isoformat(timespec="seconds")
    return TaskClosedError(f"task {task_id!r} expired at {expired_at}: ask NextComparison for a new task")


def decline_task(task_id: str, labeler_id: str, reason: DeclineReason, comment: str = "",
                 now: float | None = None) -> Op[ComparisonTask]:  # fmt: skip
    """Close this labeler's live task without a ranking: 'skipped' (no judgement) or
    'none_acceptable' (a verdict on its completions, stored here and never as a ranking,
    so no reward model trains on it). Refused like a ranking of it (`_task_refusal`)."""
    if reason not in DECLINE_REASONS:
        raise InvalidArgumentError(f"unknown decline reason {reason!r}: one of {DECLINE_REASONS}")

    def op(db: Database) -> ComparisonTask:
        at = clock(now)
        row = db.conn.execute(
            "UPDATE comparison_tasks SET status = 'declined', decline_reason = ?, decline_comment = ?, declined_at = ? "
            "WHERE id = ? AND labeler_id = ? AND status = 'leased' AND expires_at > ? RETURNING completion_ids_json",
            [reason, comment, at, task_id, labeler_id, at]).fetchone()  # fmt: skip
        if row is None:
            raise _task_refusal(db, task_id, labeler_id, "")
        if not json.loads(row[0]):  # raised inside the op: the update rolls back
            raise TaskClosedError(f"task {task_id!r} is still being prepared")
        return get_task(task_id)(db)  # type: ignore[return-value]

    return op


def labeler_day(labeler_id: str, since: float, now: float, cap: int = QUEUE_COUNT_CAP) -> Op[LabelerDay]:
    """What this labeler did since `since` (labeling work, not imports) and how many
    prompts they could be given now (`_OFFERABLE`), counted up to `cap`. A READ."""

    def op(db: Database) -> LabelerDay:
        def count(sql: str, params: Sequence[object] | dict[str, object]) -> int:
            return int(db.conn.execute(sql, params).fetchone()[0])

        mine = [labeler_id, since]
        return LabelerDay(
            rankings=count("SELECT COUNT(*) FROM rankings WHERE labeler_id = ? AND created_at >= ? AND source = 'label'", mine),
            declines=count("SELECT COUNT(*) FROM comparison_tasks "
                           "WHERE labeler_id = ? AND status = 'declined' AND declined_at >= ?", mine),
            demonstrations=count("SELECT COUNT(*) FROM demonstrations "
                                 "WHERE labeler_id = ? AND created_at >= ? AND source = 'label'", mine),
            ratings=count("SELECT COUNT(*) FROM ratings WHERE labeler_id = ? AND created_at >= ?", mine),
            queue_waiting=count(f"SELECT COUNT(*) FROM (SELECT 1 FROM prompts p WHERE {_OFFERABLE} LIMIT :cap)",
                                {"labeler": labeler_id, "now": now, "cap": cap}),
        )  # fmt: skip

    return op


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
