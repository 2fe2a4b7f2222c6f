"""Import: JSONL lines checked all at once and written in one transaction, or nothing."""


from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from sqlite_utils import Database

from common.exchange.formats import (
    IMPORT_POLICY_VERSION,
    KINDS,
    BadRecord,
    Kind,
    parse_demonstration_line,
    parse_pair_line,
    parse_ranking_line,
)
from common.identity import split_for_user
from common.store import Store
from common.store.ops.prompts import dedup_key


@dataclass(frozen=True)
class BadLine:
    number: int  # 1-based line number in the file
    reason: str

    def __str__(self) -> str:
        return f"line {self.number}: {self.reason}"


class ImportRejected(ValueError):
    """The file has bad lines; nothing was imported. `bad_lines` lists every one."""

    def __init__(self, bad_lines: Sequence[BadLine]) -> None:
        self.bad_lines = list(bad_lines)
        shown = "\n".join(f"  {b}" for b in self.bad_lines[:50])
        more = f"\n  ... and {len(self.bad_lines) - 50} more" if len(self.bad_lines) > 50 else ""
        super().__init__(f"{len(self.bad_lines)} bad line(s), nothing imported:\n{shown}{more}")


@dataclass
class ImportReport:
    """Rows written by an import, per table, and rows found already present (identical)."""

    lines: int = 0
    inserted: Counter = field(default_factory=Counter)
    already_present: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        written = ", ".join(f"{n} {table}" for table, n in sorted(self.inserted.items())) or "nothing new"
        present = ", ".join(f"{n} {table}" for table, n in sorted(self.already_present.items()))
        return f"{self.lines} lines: wrote {written}" + (f"; already present: {present}" if present else "")


def read_jsonl_lines(source: str | Path | TextIO) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a file or text stream."""
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as f:
            text = f.read()
    else:
        text = source.read()
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def parse_lines(kind: Kind, lines: Sequence[tuple[int, str]]) -> tuple[list[tuple[int, dict[str, Any]]], list[BadLine]]:
    """Parse and check every line alone: (good records with their numbers, bad lines)."""
    parse = {"rankings": parse_ranking_line, "pairs": parse_pair_line, "demonstrations": parse_demonstration_line}.get(kind)
    if parse is None:
        raise ValueError(f"Unknown kind: {kind!r} (expected one of {KINDS})")
    good, bad = [], []
    for number, line in lines:
        try:
            good.append((number, parse(json.loads(line))))
        except json.JSONDecodeError as err:
            bad.append(BadLine(number, f"not valid JSON ({err.msg} at column {err.colno})"))
        except BadRecord as err:
            bad.append(BadLine(number, str(err)))
    return good, bad


def import_jsonl(
    store: Store,
    kind: Kind,
    source: str | Path | TextIO,
    *,
    labeler_id: str = "import",
    labeler_group: str | None = "import",
) -> ImportReport:
    """Import a file of one format, all or nothing (ImportRejected lists every bad line).

    `labeler_id`/`labeler_group` are recorded for lines that carry no labeler (pairs,
    plain chat demonstrations); their prompts get a pseudo user id per prompt text
    (`import:<hash>`), so they spread over the splits like users do.
    """
    lines = read_jsonl_lines(source)
    records, bad = parse_lines(kind, lines)
    if bad:
        raise ImportRejected(bad)
    return store.write_sync(_import_op(kind, records, labeler_id, labeler_group, len(lines)))


def _import_op(kind: Kind, records: list[tuple[int, dict[str, Any]]], labeler_id: str, labeler_group: str | None, n_lines: int):
    def op(db: Database) -> ImportReport:
        writer = _RowWriter(db, time.time())
        bad: list[BadLine] = []
        counts: Counter = Counter()
        for number, record in records:
            occurrence = counts[json.dumps(record, sort_keys=True)]
            counts[json.dumps(record, sort_keys=True)] += 1
            try:
                if kind == "rankings":
                    writer.ranking_line(record)
                elif kind == "pairs":
                    writer.pair_line(record, occurrence, labeler_id, labeler_group)
                else:
                    writer.demonstration_line(record, occurrence, labeler_id, labeler_group)
            except BadRecord as err:
                bad.append(BadLine(number, str(err)))
        if bad:
            raise ImportRejected(bad)  # the store rolls this op back: nothing is written
        return ImportReport(n_lines, writer.inserted, writer.present)

    return op


def _content_id(*parts: Any) -> str:
    """A deterministic id for imported rows that came without one (re-import = no-op)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class _RowWriter:
    """Inserts a record's rows, or checks that identical ones are already there."""

    def __init__(self, db: Database, now: float) -> None:
        self.db = db
        self.now = now
        self.inserted: Counter = Counter()
        self.present: Counter = Counter()

    def _put(self, table: str, row: dict[str, Any], compare: Sequence[str]) -> None:
        existing = next(iter(self.db.query(f"SELECT * FROM {table} WHERE id = ?", [row["id"]])), None)
        if existing is None:
            columns = ", ".join(row)
            self.db.conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
            self.inserted[table] += 1
            return
        different = [c for c in compare if existing[c] != row[c]]
        if different:
            raise BadRecord(f"{table[:-1]} {row['id']!r} already exists with a different {different[0]}")
        self.present[table] += 1

    def prompt(self, p: Mapping[str, Any]) -> None:
        row = {
            "id": p["id"], "user_id": p["user_id"], "text": p["text"],
            "messages_json": None if p["messages"] is None else json.dumps(p["messages"], separators=(",", ":"), sort_keys=True),
            "source": p["source"], "split": split_for_user(p["user_id"]), "dedup_key": dedup_key(p["text"]),
            "has_pii": int(p["has_pii"]), "redacted_text": p["redacted_text"], "request_id": p["request_id"],
            "created_at": p["created_at"],
        }  # fmt: skip
        self._put("prompts", row, ("user_id", "text", "messages_json"))

    def completion(self, prompt_id: str, c: Mapping[str, Any]) -> None:
        row = {
            "id": c["id"], "prompt_id": prompt_id, "idx": c["idx"], "policy_version": c["policy_version"],
            "text": c["text"], "finish_reason": c["finish_reason"], "prompt_tokens": c["prompt_tokens"],
            "completion_tokens": c["completion_tokens"],
            "sampling_json": json.dumps(c["sampling"], separators=(",", ":"), sort_keys=True),
            "latency_s": c["latency_s"], "ttft_s": c["ttft_s"], "purpose": c["purpose"], "created_at": c["created_at"],
            "has_pii": int(c.get("has_pii", False)), "redacted_text": c.get("redacted_text"),
        }  # fmt: skip
        self._put("completions", row, ("prompt_id", "text", "policy_version"))

    def ranking(self, row: dict[str, Any]) -> None:
        self._put("rankings", row, ("prompt_id", "labeler_id", "ranking_json"))

    def ranking_line(self, r: Mapping[str, Any]) -> None:
        self.prompt(r["prompt"])
        for c in r["completions"]:
            self.completion(r["prompt"]["id"], c)
        self.ranking({
            "id": r["id"], "prompt_id": r["prompt"]["id"], "labeler_id": r["labeler_id"],
            "labeler_group": r["labeler_group"], "ranking_json": json.dumps(r["ranking"], separators=(",", ":")),
            "k": r["k"], "source": r["source"], "created_at": r["created_at"], "task_id": None,
        })  # fmt: skip

    def pair_line(self, pair: Mapping[str, Any], occurrence: int, labeler_id: str, labeler_group: str | None) -> None:
        prompt = _imported_prompt(pair["prompt_text"], pair["messages"], self.now)
        self.prompt(prompt)
        ids = []
        for idx, text in enumerate((pair["chosen"], pair["rejected"])):
            cid = _content_id("completion", prompt["id"], text)
            self.completion(prompt["id"], {
                "id": cid, "idx": idx, "text": text, "policy_version": IMPORT_POLICY_VERSION,
                "finish_reason": "stop", "prompt_tokens": 0, "completion_tokens": 0, "sampling": {},
                "latency_s": 0.0, "ttft_s": None, "purpose": "label", "created_at": prompt["created_at"],
            })  # fmt: skip
            ids.append(cid)
        self.ranking({
            "id": _content_id("pair", prompt["id"], ids, labeler_id, occurrence), "prompt_id": prompt["id"],
            "labeler_id": labeler_id, "labeler_group": labeler_group,
            "ranking_json": json.dumps([[ids[0]], [ids[1]]], separators=(",", ":")), "k": 2,
            "source": "import", "created_at": prompt["created_at"], "task_id": None,
        })  # fmt: skip

    def demonstration_line(self, d: Mapping[str, Any], occurrence: int, labeler_id: str, labeler_group: str | None) -> None:
        if d["prompt"] is not None:
            prompt, demo_id = d["prompt"], d["id"]
            labeler_id, labeler_group, created_at = d["labeler_id"], d["labeler_group"], d["created_at"]
        else:
            turns = d["turns"]
            prompt = _imported_prompt(turns[-1]["content"], turns if len(turns) > 1 else None, self.now)
            demo_id = _content_id("demonstration", prompt["id"], d["response"], labeler_id, occurrence)
            created_at = prompt["created_at"]
        self.prompt(prompt)
        row = {
            "id": demo_id, "prompt_id": prompt["id"], "labeler_id": labeler_id, "labeler_group": labeler_group,
            "response": d["response"], "source": d["source"], "created_at": created_at,
        }  # fmt: skip
        self._put("demonstrations", row, ("prompt_id", "labeler_id", "response"))


def _imported_prompt(text: str, messages: list[dict[str, str]] | None, now: float) -> dict[str, Any]:
    """A prompt row for imported data without one: id and pseudo user from its content
    (the same text imported twice is one prompt, in one split)."""
    content = _content_id("prompt", text, messages)
    return {
        "id": content, "user_id": f"import:{content[:12]}", "text": text, "messages": messages,
        "source": "import", "has_pii": False, "redacted_text": None, "request_id": None,
        "created_at": now,
    }  # fmt: skip
