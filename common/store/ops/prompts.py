"""Logged prompts and the completions the policy gave them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sqlite_utils import Database

from common.identity import split_for_user
from common.store.errors import (
    InvalidArgumentError,
    NotFoundError,
)
from common.store.ops.base import Op, clock, get_one, insert_record, insert_row, new_id, to_json
from common.store.records import (
    Completion,
    NewCompletion,
    Prompt,
    PromptSource,
    from_row,
)
from common.text import normalize_text


def dedup_key(text: str) -> str:
    """The key under which near-identical prompts collide (``common.text.normalize_text``)."""
    return normalize_text(text)


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
            "messages_json": None if messages is None else to_json([dict(m) for m in messages]),
            "source": source, "split": split_for_user(user_id), "dedup_key": dedup_key(text),
            "has_pii": int(has_pii), "redacted_text": redacted_text,
            "request_id": request_id, "created_at": clock(now),
        }  # fmt: skip
        return insert_record(db, "prompts", Prompt, row)

    return op


def get_prompt(prompt_id: str) -> Op[Prompt | None]:
    """The prompt, or None."""
    return get_one(Prompt, "prompts", "id", prompt_id)


def add_completions(
    prompt_id: str, completions: Iterable[NewCompletion], now: float | None = None
) -> Op[list[Completion]]:
    """Log samples of a prompt (the prompt must exist: foreign key)."""
    samples = list(completions)

    def op(db: Database) -> list[Completion]:
        at = clock(now)
        stored = []
        for s in samples:
            row = {
                "id": s.id or new_id(), "prompt_id": prompt_id, "idx": s.idx,
                "policy_version": s.policy_version, "text": s.text,
                "finish_reason": s.finish_reason, "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens, "sampling_json": to_json(s.sampling),
                "latency_s": s.latency_s, "ttft_s": s.ttft_s, "purpose": s.purpose,
                "created_at": at, "has_pii": int(s.has_pii), "redacted_text": s.redacted_text,
                "version_spans_json": to_json([list(span) for span in s.version_spans]) if s.version_spans else None,
            }  # fmt: skip
            insert_row(db, "completions", row)
            stored.append(from_row(Completion, row))
        return stored

    return op


def get_completion(completion_id: str) -> Op[Completion | None]:
    """One completion, or None."""
    return get_one(Completion, "completions", "id", completion_id)


def check_completions_of_prompt(db: Database, prompt_id: str, completion_ids: Sequence[str]) -> None:
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
