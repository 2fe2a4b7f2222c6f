"""Export: the store's feedback as JSONL lines of each kind (``formats``)."""


from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

from sqlite_utils import Database

from common.exchange.formats import (
    KINDS,
    Kind,
    completion_record,
    demonstration_messages,
    prompt_record,
    shown_completion_text,
    shown_prompt_text,
)
from common.store import Store
from common.store.rankings import ranking_to_pairs


def _rows_by_id(db: Database, table: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Rows of `table` ("prompts" or "completions") by id, read 500 ids per query (SQLite's
    bound-parameter limit)."""
    wanted = sorted(set(ids))
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows.update({r["id"]: r for r in db.query(f"SELECT * FROM {table} WHERE id IN ({marks})", chunk)})
    return rows


def _split_filter(splits: Sequence[str] | None) -> tuple[str, list[str]]:
    if not splits:
        return "", []
    return f" AND p.split IN ({','.join('?' * len(splits))})", list(splits)


def ranking_lines(splits: Sequence[str] | None = None, redact_pii: bool = False):
    """A store read: the rankings format's records, oldest ranking first."""

    def op(db: Database) -> list[dict[str, Any]]:
        where, params = _split_filter(splits)
        rows = list(db.query(
            f"SELECT r.* FROM rankings r JOIN prompts p ON p.id = r.prompt_id WHERE 1 = 1{where} "
            "ORDER BY r.created_at, r.id", params))  # fmt: skip
        groups = {r["id"]: json.loads(r["ranking_json"]) for r in rows}
        prompts = _rows_by_id(db, "prompts", (r["prompt_id"] for r in rows))
        completions = _rows_by_id(db, "completions", (c for g in groups.values() for group in g for c in group))
        lines = []
        for r in rows:
            prompt = prompt_record(prompts[r["prompt_id"]], redact_pii)
            if prompt["text"] is None:
                continue  # PII never redacted: left out of a redacted export
            ranked = sorted((c for group in groups[r["id"]] for c in group), key=lambda c: (completions[c]["idx"], c))
            lines.append({
                "ranking_id": r["id"], "prompt": prompt,
                "completions": [completion_record(completions[c], redact_pii) for c in ranked],
                "ranking": groups[r["id"]], "k": r["k"], "labeler_id": r["labeler_id"],
                "labeler_group": r["labeler_group"], "source": r["source"], "created_at": r["created_at"],
            })  # fmt: skip
        return lines

    return op


def pair_lines(rankings: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Pairs-format records from rankings-format records (PII: a prompt's redacted text or
    left out; a completion's redacted text)."""
    lines = []
    for record in rankings:
        prompt_text = shown_prompt_text(record["prompt"])
        if prompt_text is None:
            continue
        text = {c["id"]: shown_completion_text(c) for c in record["completions"]}
        for better, worse in ranking_to_pairs(record["ranking"]):
            lines.append({"prompt": prompt_text, "chosen": text[better], "rejected": text[worse]})
    return lines


def demonstration_lines(splits: Sequence[str] | None = None, redact_pii: bool = False):
    """A store read: the demonstrations format's records, oldest first."""

    def op(db: Database) -> list[dict[str, Any]]:
        where, params = _split_filter(splits)
        rows = list(db.query(
            f"SELECT d.* FROM demonstrations d JOIN prompts p ON p.id = d.prompt_id WHERE 1 = 1{where} "
            "ORDER BY d.created_at, d.id", params))  # fmt: skip
        prompts = _rows_by_id(db, "prompts", (r["prompt_id"] for r in rows))
        lines = []
        for d in rows:
            prompt = prompt_record(prompts[d["prompt_id"]], redact_pii)
            if prompt["text"] is None:
                continue
            lines.append({
                "messages": demonstration_messages(prompt, d["response"]),
                "demonstration_id": d["id"], "prompt": prompt, "labeler_id": d["labeler_id"],
                "labeler_group": d["labeler_group"], "source": d["source"], "created_at": d["created_at"],
            })  # fmt: skip
        return lines

    return op


def export_records(store: Store, kind: Kind, *, splits: Sequence[str] | None = None, redact_pii: bool = False) -> list[dict[str, Any]]:
    """The records of one format, read in one consistent read transaction."""
    if kind == "rankings":
        return store.read_sync(ranking_lines(splits, redact_pii))
    if kind == "pairs":
        return pair_lines(store.read_sync(ranking_lines(splits, redact_pii)))
    if kind == "demonstrations":
        return store.read_sync(demonstration_lines(splits, redact_pii))
    raise ValueError(f"Unknown kind: {kind!r} (expected one of {KINDS})")


def write_jsonl(records: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    """One compact JSON object per line; returns the number of lines."""
    n = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        n += 1
    return n


def export_jsonl(store: Store, kind: Kind, path: str | Path, **filters: Any) -> int:
    """Export one format to `path` (written to a temporary file, then renamed)."""
    records = export_records(store, kind, **filters)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        n = write_jsonl(records, out)
    tmp.replace(path)
    return n


