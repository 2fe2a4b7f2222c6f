"""The exchange's line formats: the records each kind of line holds and how a line is
checked and parsed (pure: no store)."""


from __future__ import annotations

import json
import math
from typing import Any, Literal, Mapping, get_args

from common.pii import safe_text
from common.store.errors import InvalidArgumentError
from common.store.rankings import IMPORT_MIN_K, LABEL_MAX_K, MAX_ID_CHARS, check_ranking_groups

Kind = Literal["rankings", "pairs", "demonstrations"]
KINDS: tuple[str, ...] = get_args(Kind)
IMPORT_POLICY_VERSION = -1  # completions that no policy of ours produced



PROMPT_FIELDS = ("id", "user_id", "text", "messages", "source", "has_pii", "redacted_text", "request_id", "created_at")
COMPLETION_FIELDS = (
    "id", "idx", "text", "policy_version", "finish_reason", "prompt_tokens", "completion_tokens",
    "sampling", "latency_s", "ttft_s", "purpose", "created_at", "has_pii", "redacted_text",
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


def completion_record(row: Mapping[str, Any], redact_pii: bool = False) -> dict[str, Any]:
    """A completions row as the JSON object the formats carry (``redact_pii``: a flagged
    one's text is its redacted text)."""
    record = {name: row.get(name) for name in COMPLETION_FIELDS if name != "sampling"}
    record["sampling"] = json.loads(row.get("sampling_json") or "{}")
    record["has_pii"] = bool(record["has_pii"])
    if redact_pii and record["has_pii"]:
        record["text"] = shown_completion_text(record)
    return record


def shown_completion_text(completion: Mapping[str, Any]) -> str:
    """The text a completion may be shown or trained with: a flagged one's redacted text
    (redacted now when none was stored)."""
    return safe_text(completion["text"], bool(completion.get("has_pii")), completion.get("redacted_text"))


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
            "has_pii": bool(_require(obj, "has_pii", bool, optional=True)),
            "redacted_text": _require(obj, "redacted_text", str, optional=True),
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


