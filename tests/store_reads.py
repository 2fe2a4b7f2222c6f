"""Reads that only tests need: what a prompt's logged completions are, to check what the
server and the store's writes left behind (production reads completions by id or through
the cycle's snapshot, `trainer.snapshot_data.read_rows`)."""

from __future__ import annotations

from sqlite_utils import Database

from common.store.records import Completion, from_row


def completions_of(prompt_id: str):  # -> Op[list[Completion]]
    """The store op reading a prompt's completions in logging order (then by index)."""

    def op(db: Database) -> list[Completion]:
        rows = db.table("completions").rows_where("prompt_id = ?", [prompt_id], order_by="created_at, idx, id")
        return [from_row(Completion, row) for row in rows]

    return op
