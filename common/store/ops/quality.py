"""Labeler quality and the ratings report: gold rankings (the operator's ranking of a
prompt's completions, which labelers given a task over exactly those completions are
scored against) and the reads behind Admin.GetLabelerQuality and Admin.GetRatingsReport.

The reads return plain records; the agreement math is `common.agreement`'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from sqlite_utils import Database

from common.store.errors import InvalidArgumentError
from common.store.ops.base import Op, clock, get_one, to_json
from common.store.ops.prompts import check_completions_of_prompt
from common.store.rankings import check_not_all_tied, check_ranking_shape
from common.store.records import (
    GoldRanking,
    LabelerWork,
    LabelRecord,
    VersionRatingCounts,
    from_row,
)

_FLAG_NAME = re.compile(r"[a-z_]+")


def set_gold_ranking(
    prompt_id: str,
    ranking: Sequence[Sequence[str]],
    set_by: str,
    *,
    check_groups: Callable[[list[list[str]]], None] = check_not_all_tied,
    now: float | None = None,
) -> Op[tuple[GoldRanking, bool]]:
    """Store the gold ranking of a prompt's completions, replacing an earlier one; return it
    and whether one was replaced. Checked as `add_ranking` checks (the groups' shape, the
    ids against the prompt's completions, then `check_groups`: K and ties), and the prompt
    must be one labelers are shown (train or val split, not an unredacted PII prompt)."""
    groups = [list(group) for group in ranking]

    def op(db: Database) -> tuple[GoldRanking, bool]:
        ids = check_ranking_shape(groups)
        check_completions_of_prompt(db, prompt_id, ids)
        check_groups(groups)
        split, has_pii, redacted = db.conn.execute(
            "SELECT split, has_pii, redacted_text FROM prompts WHERE id = ?", [prompt_id]).fetchone()  # fmt: skip
        if split == "test":
            raise InvalidArgumentError(f"prompt {prompt_id!r} is in the test split, which labelers are never shown: "
                                       "it cannot be a gold task")
        if has_pii and redacted is None:
            raise InvalidArgumentError(f"prompt {prompt_id!r} is flagged as holding PII and has no redacted text, so "
                                       "labelers are never shown it: it cannot be a gold task")
        replaced = db.conn.execute("SELECT 1 FROM gold_rankings WHERE prompt_id = ?", [prompt_id]).fetchone() is not None
        row = {"prompt_id": prompt_id, "completion_ids_json": to_json(sorted(ids)), "ranking_json": to_json(groups),
               "set_by": set_by, "created_at": clock(now)}  # fmt: skip
        db.conn.execute(
            "INSERT OR REPLACE INTO gold_rankings (prompt_id, completion_ids_json, ranking_json, set_by, created_at) "
            "VALUES (:prompt_id, :completion_ids_json, :ranking_json, :set_by, :created_at)", row)  # fmt: skip
        return from_row(GoldRanking, row), replaced

    return op


def get_gold_ranking(prompt_id: str) -> Op[GoldRanking | None]:
    """The prompt's gold ranking, or None."""
    return get_one(GoldRanking, "gold_rankings", "prompt_id", prompt_id)


def labeler_work() -> Op[LabelerWork]:
    """Everything labeler quality is computed from: every ranking labelers submitted
    (source 'label': imported ones say nothing about this service's labelers), oldest
    first, with its seconds from shown_at; declined tasks per labeler; each labeler's group
    from their users row (for one who only declined); the gold rankings. A READ of every
    labeling ranking: an operator's report, not a per-request path."""

    def op(db: Database) -> LabelerWork:
        rankings = [
            LabelRecord(labeler, group, prompt_id, json.loads(ranking), seconds)
            for labeler, group, prompt_id, ranking, seconds in db.conn.execute(
                "SELECT r.labeler_id, r.labeler_group, r.prompt_id, r.ranking_json, r.created_at - t.shown_at "
                "FROM rankings r LEFT JOIN comparison_tasks t ON t.id = r.task_id "
                "WHERE r.source = 'label' ORDER BY r.created_at, r.id")
        ]  # fmt: skip
        declined = dict(db.conn.execute(
            "SELECT labeler_id, COUNT(*) FROM comparison_tasks WHERE status = 'declined' GROUP BY labeler_id").fetchall())  # fmt: skip
        groups = dict(db.conn.execute(
            "SELECT id, labeler_group FROM users WHERE id IN (SELECT labeler_id FROM rankings WHERE source = 'label' "
            "UNION SELECT labeler_id FROM comparison_tasks WHERE status = 'declined')").fetchall())  # fmt: skip
        gold = [from_row(GoldRanking, row) for row in db.query("SELECT * FROM gold_rankings ORDER BY prompt_id")]
        return LabelerWork(rankings, declined, groups, gold)

    return op


def ratings_by_version(flag_names: Sequence[str]) -> Op[list[VersionRatingCounts]]:
    """Per policy version, oldest first: the ratings of its completions, their mean Likert
    score and how many set each of `flag_names` (the RatingFlags fields; a flag a rating
    never stored counts as unset). Completions two versions produced (a hot swap in "keep"
    mode: `version_spans_json`) are nobody's sample and left out."""
    for name in flag_names:
        if not _FLAG_NAME.fullmatch(name):
            raise InvalidArgumentError(f"not a flag name: {name!r}")
    sums = "".join(f", SUM(CASE WHEN json_extract(r.flags_json, '$.{name}') THEN 1 ELSE 0 END)" for name in flag_names)

    def op(db: Database) -> list[VersionRatingCounts]:
        rows = db.conn.execute(
            f"SELECT c.policy_version, COUNT(*), AVG(r.overall){sums} "
            "FROM ratings r JOIN completions c ON c.id = r.completion_id "
            "WHERE c.version_spans_json IS NULL GROUP BY c.policy_version ORDER BY c.policy_version").fetchall()  # fmt: skip
        return [VersionRatingCounts(version, n, mean, dict(zip(flag_names, counts)))
                for version, n, mean, *counts in rows]  # fmt: skip

    return op
