"""Retention: deleting logged prompts and completions older than a cutoff that nothing uses.

What stays, whatever its age (the rule ``prune_old_*`` apply; `rlhf store prune` and the
trainer's retention job drive them):
  * a completion that a ranking orders, that a rating rates, that a gold ranking names
    (labelers keep being scored against it), or that a comparison task names unless the
    task expired (a leased, submitted or declined one: a "none acceptable" verdict is data);
  * a prompt with a ranking, a demonstration, a gold ranking, a comparison task that did
    not expire, or any completion still stored;
  * every prompt of `keep_splits` and its completions (the caller passes the evaluation
    splits there: the gate evaluates on the oldest val prompts, and the test split is the
    untouched final evaluation, so pruning them would change what versions are compared on).
Expired comparison tasks that name a pruned completion (or belong to a pruned prompt) go
with it: `reusable_completions` would otherwise hand out a task with missing completions.
Idempotency records older than the cutoff go too, whatever their method: the answers of
Generate and NextComparison hold completions' text, and a retry weeks later is no retry.

The server writes concurrently, so each op does a bounded amount of work: it scans at most
`limit` rows in (created_at, rowid) order after a cursor and returns where the next one
resumes; `prune_in_batches` queues one op at a time, so the single writer never runs more
than one batch of deletes between the server's own writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sqlite_utils import Database

from common.store.ops.base import Op

Cursor = tuple[float, int]  # (created_at, rowid) of the last row a step scanned


@dataclass(frozen=True)
class PruneStep:
    """What one bounded op scanned and deleted; `cursor` is None once the scan reached the cutoff."""

    scanned: int
    deleted: dict[str, int]
    cursor: Cursor | None


@dataclass
class PruneReport:
    """Totals of a whole pruning pass (`prune_in_batches`)."""

    cutoff: float
    deleted: dict[str, int] = field(default_factory=dict)
    scanned: int = 0
    batches: int = 0

    def add(self, step: PruneStep) -> None:
        self.scanned += step.scanned
        self.batches += 1
        for table, n in step.deleted.items():
            self.deleted[table] = self.deleted.get(table, 0) + n


def _in_splits(column: str, splits: Sequence[str]) -> tuple[str, list[str]]:
    """SQL true for rows whose `column` is one of `splits` (false for none), and its parameters."""
    if not splits:
        return "0", []
    return f"{column} IN ({','.join('?' * len(splits))})", list(splits)


def _after(alias: str, cursor: Cursor | None) -> tuple[str, list[float | int]]:
    if cursor is None:
        return "", []
    return f" AND ({alias}.created_at, {alias}.rowid) > (?, ?)", [cursor[0], cursor[1]]


def _delete_ids(db: Database, table: str, ids: Iterable[str]) -> int:
    ids = list(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        db.conn.execute(f"DELETE FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)
    return len(ids)


def _expired_tasks_naming(db: Database, prompt_ids: set[str], completion_ids: set[str] | None) -> list[str]:
    """Expired tasks of these prompts that name one of `completion_ids` (all of them when None)."""
    if not prompt_ids:
        return []
    marks = ",".join("?" * len(prompt_ids))
    rows = db.conn.execute(
        f"SELECT id, completion_ids_json FROM comparison_tasks WHERE status = 'expired' AND prompt_id IN ({marks})",
        sorted(prompt_ids)).fetchall()  # fmt: skip
    return [tid for tid, ids in rows if completion_ids is None or completion_ids & set(json.loads(ids))]


def prune_old_completions(
    cutoff: float, keep_splits: Sequence[str], after: Cursor | None = None, limit: int = 500
) -> Op[PruneStep]:
    """Delete the completions logged before `cutoff` that nothing uses (module docstring),
    scanning at most `limit` of them after `after`."""
    kept_split, split_params = _in_splits("p.split", keep_splits)
    resume, resume_params = _after("c", after)

    def op(db: Database) -> PruneStep:
        rows = db.conn.execute(
            f"""
            SELECT c.created_at, c.rowid, c.id, c.prompt_id,
                   ({kept_split}
                    OR EXISTS (SELECT 1 FROM ratings ra WHERE ra.completion_id = c.id)
                    OR EXISTS (SELECT 1 FROM rankings r, json_each(r.ranking_json) g, json_each(g.value) x
                               WHERE r.prompt_id = c.prompt_id AND x.value = c.id)
                    OR EXISTS (SELECT 1 FROM comparison_tasks t, json_each(t.completion_ids_json) x
                               WHERE t.prompt_id = c.prompt_id AND t.status != 'expired' AND x.value = c.id)
                    OR EXISTS (SELECT 1 FROM gold_rankings g, json_each(g.completion_ids_json) x
                               WHERE g.prompt_id = c.prompt_id AND x.value = c.id)
                   ) AS used
            FROM completions c JOIN prompts p ON p.id = c.prompt_id
            WHERE c.created_at < ?{resume}
            ORDER BY c.created_at, c.rowid LIMIT ?
            """, [*split_params, cutoff, *resume_params, limit]).fetchall()  # fmt: skip
        doomed = {cid: pid for _, _, cid, pid, used in rows if not used}
        tasks = _expired_tasks_naming(db, set(doomed.values()), set(doomed))
        deleted = {"comparison_tasks": _delete_ids(db, "comparison_tasks", tasks),
                   "completions": _delete_ids(db, "completions", doomed)}
        return PruneStep(len(rows), deleted, _next_cursor(rows, limit))

    return op


def prune_old_prompts(
    cutoff: float, keep_splits: Sequence[str], after: Cursor | None = None, limit: int = 500
) -> Op[PruneStep]:
    """Delete the prompts logged before `cutoff` that nothing uses (module docstring; a
    prompt keeps while any completion of it is stored, so prune completions first),
    scanning at most `limit` of them after `after`."""
    kept_split, split_params = _in_splits("p.split", keep_splits)
    resume, resume_params = _after("p", after)

    def op(db: Database) -> PruneStep:
        rows = db.conn.execute(
            f"""
            SELECT p.created_at, p.rowid, p.id,
                   ({kept_split}
                    OR EXISTS (SELECT 1 FROM rankings r WHERE r.prompt_id = p.id)
                    OR EXISTS (SELECT 1 FROM demonstrations d WHERE d.prompt_id = p.id)
                    OR EXISTS (SELECT 1 FROM gold_rankings g WHERE g.prompt_id = p.id)
                    OR EXISTS (SELECT 1 FROM comparison_tasks t WHERE t.prompt_id = p.id AND t.status != 'expired')
                    OR EXISTS (SELECT 1 FROM completions c WHERE c.prompt_id = p.id)
                   ) AS used
            FROM prompts p
            WHERE p.created_at < ?{resume}
            ORDER BY p.created_at, p.rowid LIMIT ?
            """, [*split_params, cutoff, *resume_params, limit]).fetchall()  # fmt: skip
        doomed = {pid for _, _, pid, used in rows if not used}
        tasks = _expired_tasks_naming(db, doomed, None)
        deleted = {"comparison_tasks": _delete_ids(db, "comparison_tasks", tasks),
                   "prompts": _delete_ids(db, "prompts", doomed)}
        return PruneStep(len(rows), deleted, _next_cursor(rows, limit))

    return op


def prune_old_idempotency(cutoff: float, limit: int = 500) -> Op[PruneStep]:
    """Delete at most `limit` idempotency records made before `cutoff`."""

    def op(db: Database) -> PruneStep:
        n = db.conn.execute(
            "DELETE FROM idempotency WHERE rowid IN "
            "(SELECT rowid FROM idempotency WHERE created_at < ? ORDER BY created_at LIMIT ?)",
            [cutoff, limit]).rowcount  # fmt: skip
        # Every deleted row leaves the scan, so the next op starts from the oldest again.
        return PruneStep(n, {"idempotency": n}, None if n < limit else (cutoff, 0))

    return op


def _next_cursor(rows: Sequence[Sequence[object]], limit: int) -> Cursor | None:
    if len(rows) < limit:
        return None
    created_at, rowid = rows[-1][0], rows[-1][1]
    return float(created_at), int(rowid)  # type: ignore[arg-type]


StepFactory = Callable[[Cursor | None], Op[PruneStep]]


def prune_in_batches(
    write: Callable[[Op[PruneStep]], PruneStep],
    cutoff: float,
    keep_splits: Sequence[str],
    batch_rows: int = 500,
) -> PruneReport:
    """Apply the retention rule to everything logged before `cutoff`, one bounded op at a
    time: completions, then prompts (a prompt goes only once its completions did), then
    idempotency records. `write` runs one op and returns once it committed
    (`store.write_sync`)."""
    report = PruneReport(cutoff)
    steps: list[StepFactory] = [
        lambda c: prune_old_completions(cutoff, keep_splits, c, batch_rows),
        lambda c: prune_old_prompts(cutoff, keep_splits, c, batch_rows),
        lambda c: prune_old_idempotency(cutoff, batch_rows),
    ]
    for step in steps:
        cursor: Cursor | None = None
        while True:
            done = write(step(cursor))
            report.add(done)
            if done.cursor is None:
                break
            cursor = done.cursor
    return report
