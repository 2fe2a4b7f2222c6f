"""Row counts for `Admin.GetStats`."""

from __future__ import annotations

from sqlite_utils import Database

from common.store.ops.base import Op
from common.store.ops.policies import serving_policy
from common.store.records import (
    Stats,
)

_COUNTED_TABLES = (
    "users", "prompts", "completions", "rankings", "demonstrations", "ratings",
    "policies", "cycles",
)  # fmt: skip


def stats() -> Op[Stats]:
    """Row counts, prompts per split and the serving version (Admin.GetStats)."""

    def op(db: Database) -> Stats:
        counts = {name: db.table(name).count for name in _COUNTED_TABLES}
        by_split = {s: 0 for s in ("train", "val", "test")}
        for row in db.query("SELECT split, COUNT(*) AS n FROM prompts GROUP BY split"):
            by_split[row["split"]] = row["n"]
        serving = serving_policy()(db)
        mixed = db.conn.execute("SELECT COUNT(*) FROM completions WHERE version_spans_json IS NOT NULL").fetchone()[0]
        return Stats(
            serving_version=None if serving is None else serving.version,
            prompts_by_split=by_split, mixed_version_completions=mixed,
            **counts,
        )

    return op
