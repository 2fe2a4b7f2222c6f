"""Feedback in and out of the store as JSONL: rankings, pairwise preferences, demonstrations.

Three formats, one JSON object per line:

- ``rankings`` (K-way, lossless): one line per ranking, with everything needed to rebuild
  its rows in a fresh store: the prompt row, the ranked completions' rows, the best-first
  groups of completion ids, the labeler and the timestamps::

      {"ranking_id": "...", "prompt": {"id", "user_id", "text", "messages", "source",
       "has_pii", "redacted_text", "request_id", "created_at"},
       "completions": [{"id", "idx", "text", "policy_version", "finish_reason",
       "prompt_tokens", "completion_tokens", "sampling", "latency_s", "ttft_s", "purpose",
       "created_at"}, ...],
       "ranking": [["c2"], ["c0", "c1"], ["c3"]], "k": 4, "labeler_id": "...",
       "labeler_group": "train", "source": "label", "created_at": 1700000000.0}

- ``pairs``: ``{"prompt": str, "chosen": str, "rejected": str}``, the preference format
  TRL's reward trainer reads. Export expands each ranking into its C(K,2) pairs minus the
  ties; import turns each line into a K = 2 comparison (source "import"), the bootstrap
  path. TRL's conversational variant (lists of {"role", "content"}) is accepted on import.

- ``demonstrations``: ``{"messages": [..., {"role": "assistant", "content": response}]}``,
  the chat format SFT trainers read, plus the ids, the labeler and the prompt row in
  extra keys so the round trip rebuilds the rows. A plain chat file (no extra keys)
  imports too.

Import is all or nothing: every line is checked (JSON, fields, types, ranking shape,
then against the store: completions belong to their prompt, re-imported rows are
identical) and EVERY bad line is reported with its number and reason; one bad line and
nothing is written. The writes happen in one transaction. Re-importing a file is a no-op
(rows keep their ids, identical rows are skipped). Not carried: comparison tasks (leases
are queue state, not data), so an imported ranking has no task_id.

PII: export is lossless by default (a backup must restore what it saved); ``redact_pii``
writes the redacted text of flagged prompts instead (and leaves out flagged prompts that
have none), for files that leave the operator's hands. Pairs are training data and
always use the redacted text (or leave the prompt out). Only PROMPTS carry a PII flag:
completions and demonstrations are written as stored, and a model may echo what a user
wrote, so a file meant for outsiders still needs a look (or a pass of the trainer's PII
filter) over its responses.

The ranking checks (`check_ranking_groups`) are shared with the Feedback service.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, TextIO, get_args

from sqlite_utils import Database

from common.identity import split_for_user
from common.store import Store
from common.store.errors import InvalidArgumentError
from common.store.ops.prompts import dedup_key

Kind = Literal["rankings", "pairs", "demonstrations"]
KINDS: tuple[str, ...] = get_args(Kind)
Groups = list[list[str]]

LABEL_MIN_K, LABEL_MAX_K = 4, 9  # the labeling queue (the paper's K = 4..9)
IMPORT_MIN_K = 2  # imported comparisons may be pairs
MAX_ID_CHARS = 128
IMPORT_POLICY_VERSION = -1  # completions that no policy of ours produced

# ------------------------------------------------------------------ rankings, pure


def check_ranking_shape(groups: Sequence[Sequence[str]]) -> list[str]:
    """Raise InvalidArgumentError unless the ranking has groups, no group is empty, and
    every id is a non-blank string named once; return the ids, best first."""
    if not groups:
        raise InvalidArgumentError("the ranking is empty: give the completions best first, in groups")
    for number, group in enumerate(groups, start=1):
        if not group:
            raise InvalidArgumentError(f"group {number} of the ranking is empty")
        for cid in group:
            if not isinstance(cid, str) or not cid.strip():
                raise InvalidArgumentError(f"group {number} holds an empty completion id")
            if len(cid) > MAX_ID_CHARS:
                raise InvalidArgumentError(f"completion id {cid[:20]!r}... is longer than {MAX_ID_CHARS} characters")
    ids = [cid for group in groups for cid in group]
    if len(set(ids)) != len(ids):  # the common case costs one set; name the culprit only on failure
        repeated = next(cid for cid, n in Counter(ids).items() if n > 1)
        raise InvalidArgumentError(f"completion {repeated!r} appears more than once in the ranking")
    return ids


def check_ranking_groups(groups: Sequence[Sequence[str]], *, min_k: int, max_k: int) -> list[str]:
    """`check_ranking_shape`, then min_k <= K <= max_k and not all tied; return the ids."""
    ids = check_ranking_shape(groups)
    check_k(len(ids), min_k=min_k, max_k=max_k)
    check_not_all_tied(groups)
    return ids


def check_not_all_tied(groups: Sequence[Sequence[str]]) -> None:
    """An all-tied ranking implies no pair: it says nothing, and is refused."""
    if len(groups) == 1 and len(groups[0]) > 1:
        raise InvalidArgumentError(f"all {len(groups[0])} completions are tied: a ranking must prefer at least one")


def check_k(k: int, *, min_k: int, max_k: int) -> None:
    """Raise InvalidArgumentError unless min_k <= k <= max_k."""
    if not min_k <= k <= max_k:
        raise InvalidArgumentError(f"the ranking orders K = {k} completions; K must be {min_k}..{max_k}")


def ranking_to_pairs(groups: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """Every (better, worse) pair a best-first ranking implies; tied ids give no pair.
    [["a"], ["b", "c"]] -> [("a", "b"), ("a", "c")]."""
    return [
        (better, worse)
        for i, upper in enumerate(groups)
        for lower in groups[i + 1 :]
        for better in upper
        for worse in lower
    ]


def count_pairs(groups: Sequence[Sequence[str]]) -> int:
    """len(ranking_to_pairs(groups)) without building them: sum over i < j of |g_i| |g_j|."""
    sizes = [len(g) for g in groups]
    total = sum(sizes)
    return (total * total - sum(s * s for s in sizes)) // 2


# ------------------------------------------------------------------ records (lines)

PROMPT_FIELDS = ("id", "user_id", "text", "messages", "source", "has_pii", "redacted_text", "request_id", "created_at")
COMPLETION_FIELDS = (
    "id", "idx", "text", "policy_version", "finish_reason", "prompt_tokens", "completion_tokens",
    "sampling", "latency_s", "ttft_s", "purpose", "created_at",
)  # fmt: skip


class BadRecord(ValueError):
    """A line that cannot be imported; the message says why."""


def prompt_record(row: Mapping[str, Any], redact_pii: bool = False) -> dict[str, Any]:
    """A prompts row (columns as stored) as the JSON object the formats carry."""
    record = {name: row.get(name) for name in PROMPT_FIELDS if name != "messages"}
    record["messages"] = None if row.get("messages_json") is None else json.loads(row["messages_json"])
    record["has_pii"] = bool(record["has_pii"])
    if redact_pii and record["has_pii"]:
        record.update(text=row["redacted_text"], messages=None)
    return record


def completion_record(row: Mapping[str, Any]) -> dict[str, Any]:
    record = {name: row.get(name) for name in COMPLETION_FIELDS if name != "sampling"}
    record["sampling"] = json.loads(row.get("sampling_json") or "{}")
    return record


def shown_prompt_text(prompt: Mapping[str, Any]) -> str | None:
    """The text a prompt may be shown or trained with: the redacted text when it holds
    PII (None when it holds PII and was never redacted)."""
    if prompt["has_pii"]:
        return prompt.get("redacted_text")
    return prompt["text"]


def demonstration_messages(prompt: Mapping[str, Any], response: str) -> list[dict[str, str]]:
    """The conversation an SFT trainer reads: the prompt's turns, then the response."""
    turns = prompt.get("messages") or [{"role": "user", "content": prompt["text"]}]
    return [dict(m) for m in turns] + [{"role": "assistant", "content": response}]


def _require(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = obj.get(name)
    if value is None:
        if optional:
            return None
        raise BadRecord(f"missing field {name!r}")
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRecord(f"field {name!r} must be {_type_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise BadRecord(f"field {name!r} must be {_type_name(kind)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRecord(f"field {name!r} must be finite")
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _require_id(obj: Mapping[str, Any], name: str) -> str:
    value = _require(obj, name, str)
    if not value.strip() or len(value) > MAX_ID_CHARS:
        raise BadRecord(f"field {name!r} must be a non-empty id of at most {MAX_ID_CHARS} characters")
    return value


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{where} must be a non-empty list of {{'role', 'content'}} objects")
    for n, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise BadRecord(f"{where}[{n}] must be {{'role': system|user|assistant, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_prompt(obj: Any) -> dict[str, Any]:
    """Validate a prompt object of the rankings/demonstrations formats; return it normalised."""
    if not isinstance(obj, dict):
        raise BadRecord("field 'prompt' must be an object")
    try:
        prompt = {
            "id": _require_id(obj, "id"),
            "user_id": _require_id(obj, "user_id"),
            "text": _require(obj, "text", str),
            "messages": None if obj.get("messages") is None else _check_messages(obj["messages"], "prompt.messages"),
            "source": obj.get("source", "import"),
            "has_pii": bool(_require(obj, "has_pii", bool, optional=True)),
            "redacted_text": _require(obj, "redacted_text", str, optional=True),
            "request_id": _require(obj, "request_id", str, optional=True),
            "created_at": float(_require(obj, "created_at", (int, float))),
        }
    except BadRecord as err:
        raise BadRecord(f"prompt: {err}") from None
    if prompt["source"] not in ("traffic", "label", "demonstration", "import"):
        raise BadRecord(f"prompt: unknown source {prompt['source']!r}")
    if not prompt["text"].strip():
        raise BadRecord("prompt: empty text")
    return prompt


def parse_completion(obj: Any, n: int) -> dict[str, Any]:
    """Validate completion number `n` (1-based) of a rankings line."""
    if not isinstance(obj, dict):
        raise BadRecord(f"completions[{n}] must be an object")
    try:
        completion = {
            "id": _require_id(obj, "id"),
            "idx": _require(obj, "idx", int),
            "text": _require(obj, "text", str),
            "policy_version": _require(obj, "policy_version", int),
            "finish_reason": obj.get("finish_reason", "stop"),
            "prompt_tokens": _require(obj, "prompt_tokens", int, optional=True) or 0,
            "completion_tokens": _require(obj, "completion_tokens", int, optional=True) or 0,
            "sampling": _require(obj, "sampling", dict, optional=True) or {},
            "latency_s": float(_require(obj, "latency_s", (int, float), optional=True) or 0.0),
            "ttft_s": _require(obj, "ttft_s", (int, float), optional=True),
            "purpose": obj.get("purpose", "label"),
            "created_at": float(_require(obj, "created_at", (int, float))),
        }
    except BadRecord as err:
        raise BadRecord(f"completions[{n}]: {err}") from None
    if completion["finish_reason"] not in ("stop", "length", "abort"):
        raise BadRecord(f"completions[{n}]: unknown finish_reason {completion['finish_reason']!r}")
    if completion["purpose"] not in ("serve", "label"):
        raise BadRecord(f"completions[{n}]: unknown purpose {completion['purpose']!r}")
    if completion["idx"] < 0 or completion["prompt_tokens"] < 0 or completion["completion_tokens"] < 0:
        raise BadRecord(f"completions[{n}]: idx and token counts must be >= 0")
    return completion


def parse_ranking_line(obj: Any) -> dict[str, Any]:
    """Validate one line of the rankings format (everything that needs no store)."""
    if not isinstance(obj, dict):
        raise BadRecord("a line must be a JSON object")
    prompt = parse_prompt(obj.get("prompt"))
    raw_completions = _require(obj, "completions", list)
    completions = [parse_completion(c, n) for n, c in enumerate(raw_completions, start=1)]
    groups = _require(obj, "ranking", list)
    if not all(isinstance(g, list) for g in groups):
        raise BadRecord("field 'ranking' must be a list of lists of completion ids")
    try:
        ids = check_ranking_groups(groups, min_k=IMPORT_MIN_K, max_k=LABEL_MAX_K)
    except InvalidArgumentError as err:
        raise BadRecord(str(err)) from None
    given = [c["id"] for c in completions]
    if len(set(given)) != len(given):
        raise BadRecord("a completion id appears twice in 'completions'")
    if set(given) != set(ids):
        unranked = sorted(set(given) - set(ids))
        unknown = sorted(set(ids) - set(given))
        raise BadRecord(f"the ranking must order exactly the listed completions (unranked: {unranked}, not listed: {unknown})")
    k = obj.get("k", len(ids))
    if k != len(ids):
        raise BadRecord(f"field 'k' is {k} but the ranking orders {len(ids)} completions")
    source = obj.get("source", "import")
    if source not in ("label", "import"):
        raise BadRecord(f"unknown source {source!r} (label or import)")
    return {
        "id": _require_id(obj, "ranking_id"),
        "prompt": prompt,
        "completions": completions,
        "ranking": [list(g) for g in groups],
        "k": len(ids),
        "labeler_id": _require_id(obj, "labeler_id"),
        "labeler_group": _require(obj, "labeler_group", str, optional=True),
        "source": source,
        "created_at": float(_require(obj, "created_at", (int, float))),
    }


def _turn_text(value: Any, field_name: str, role: str) -> str:
    """A pairs field as text: a string, or TRL's conversational list (last `role` turn)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        turns = [m for m in _check_messages(value, field_name) if m["role"] == role]
        if not turns:
            raise BadRecord(f"field {field_name!r} holds no {role} turn")
        text = turns[-1]["content"]
    else:
        raise BadRecord(f"field {field_name!r} must be a string or a list of chat turns")
    if not text.strip():
        raise BadRecord(f"field {field_name!r} is empty")
    return text


def parse_pair_line(obj: Any) -> dict[str, Any]:
    """Validate one line of the pairs format: prompt (text or chat), chosen, rejected."""
    if not isinstance(obj, dict):
        raise BadRecord("a line must be a JSON object")
    for name in ("prompt", "chosen", "rejected"):
        if name not in obj:
            raise BadRecord(f"missing field {name!r}")
    messages = _check_messages(obj["prompt"], "prompt") if isinstance(obj["prompt"], list) else None
    pair = {
        "prompt_text": _turn_text(obj["prompt"], "prompt", "user"),
        "messages": messages,
        "chosen": _turn_text(obj["chosen"], "chosen", "assistant"),
        "rejected": _turn_text(obj["rejected"], "rejected", "assistant"),
    }
    if pair["chosen"] == pair["rejected"]:
        raise BadRecord("chosen and rejected are the same text: no preference")
    return pair


def parse_demonstration_line(obj: Any) -> dict[str, Any]:
    """Validate one line of the demonstrations format (with or without the extra keys)."""
    if not isinstance(obj, dict):
        raise BadRecord("a line must be a JSON object")
    messages = _check_messages(obj.get("messages"), "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise BadRecord("messages must end with a user turn followed by the assistant's response")
    if not messages[-1]["content"].strip():
        raise BadRecord("the response (last assistant turn) is empty")
    demo = {"response": messages[-1]["content"], "turns": messages[:-1]}
    if obj.get("prompt") is None:
        demo.update(prompt=None, id=None, labeler_id=None, labeler_group=None, source="import", created_at=None)
        return demo
    prompt = parse_prompt(obj["prompt"])
    expected = demonstration_messages(prompt, demo["response"])
    if expected != messages:
        raise BadRecord("messages do not match the prompt object (edit both or drop 'prompt')")
    source = obj.get("source", "import")
    if source not in ("label", "import"):
        raise BadRecord(f"unknown source {source!r} (label or import)")
    demo.update(
        prompt=prompt,
        id=_require_id(obj, "demonstration_id"),
        labeler_id=_require_id(obj, "labeler_id"),
        labeler_group=_require(obj, "labeler_group", str, optional=True),
        source=source,
        created_at=float(_require(obj, "created_at", (int, float))),
    )
    return demo


# ------------------------------------------------------------------ export (store-backed)


def _prompts_by_id(db: Database, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    wanted = sorted(set(ids))
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows.update({r["id"]: r for r in db.query(f"SELECT * FROM prompts WHERE id IN ({marks})", chunk)})
    return rows


def _completions_by_id(db: Database, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    wanted = sorted(set(ids))
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows.update({r["id"]: r for r in db.query(f"SELECT * FROM completions WHERE id IN ({marks})", chunk)})
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
        prompts = _prompts_by_id(db, (r["prompt_id"] for r in rows))
        completions = _completions_by_id(db, (c for g in groups.values() for group in g for c in group))
        lines = []
        for r in rows:
            prompt = prompt_record(prompts[r["prompt_id"]], redact_pii)
            if prompt["text"] is None:
                continue  # PII never redacted: left out of a redacted export
            ranked = sorted((c for group in groups[r["id"]] for c in group), key=lambda c: (completions[c]["idx"], c))
            lines.append({
                "ranking_id": r["id"], "prompt": prompt,
                "completions": [completion_record(completions[c]) for c in ranked],
                "ranking": groups[r["id"]], "k": r["k"], "labeler_id": r["labeler_id"],
                "labeler_group": r["labeler_group"], "source": r["source"], "created_at": r["created_at"],
            })  # fmt: skip
        return lines

    return op


def pair_lines(rankings: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Pairs-format records from rankings-format records (PII: redacted text or left out)."""
    lines = []
    for record in rankings:
        prompt_text = shown_prompt_text(record["prompt"])
        if prompt_text is None:
            continue
        text = {c["id"]: c["text"] for c in record["completions"]}
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
        prompts = _prompts_by_id(db, (r["prompt_id"] for r in rows))
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


# ------------------------------------------------------------------ import (store-backed)


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
