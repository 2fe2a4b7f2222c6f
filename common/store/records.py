"""The rows the store hands back, as frozen dataclasses.

Field names are the column names, except that a `*_json` column appears decoded under
its name without the suffix (`sampling_json` → `sampling: dict`), and 0/1 flags as bool.
Timestamps are unix seconds (float).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from common.identity import Identity, Role, Split

PromptSource = Literal["traffic", "label", "demonstration", "import"]
FinishReason = Literal["stop", "length", "abort"]
CompletionPurpose = Literal["serve", "label"]
TaskStatus = Literal["leased", "submitted", "expired", "declined"]
DeclineReason = Literal["skipped", "none_acceptable"]
DECLINE_REASONS: tuple[str, ...] = ("skipped", "none_acceptable")
FeedbackSource = Literal["label", "import"]
PolicyStatus = Literal["candidate", "serving", "rejected", "retired"]
CycleState = Literal["queued", "running", "promoted", "rejected", "skipped", "failed"]
CYCLE_TERMINAL_STATES: frozenset[str] = frozenset({"promoted", "rejected", "skipped", "failed"})

R = TypeVar("R")


@functools.cache
def _field_specs(cls: type) -> tuple[tuple[str, str, bool], ...]:
    """(field name, `<name>_json` column name, is bool) per field; cached because
    `from_row` runs on the writer thread for every row written."""
    return tuple((f.name, f"{f.name}_json", f.type == "bool") for f in dataclasses.fields(cls))


def from_row(cls: type[R], row: Mapping[str, Any]) -> R:
    """Build record `cls` from a row dict, decoding `<name>_json` columns and bool flags."""
    values: dict[str, Any] = {}
    for name, json_name, is_bool in _field_specs(cls):
        if name in row:
            values[name] = bool(row[name]) if is_bool else row[name]
        elif json_name in row:
            raw = row[json_name]
            values[name] = None if raw is None else json.loads(raw)
    return cls(**values)


@dataclass(frozen=True)
class User:
    id: str
    created_at: float
    labeler_group: str | None
    train_opt_out: bool = False  # "do not train on my data": served as usual, never trained on


@dataclass(frozen=True)
class ApiKey:
    """A stored key: only its sha256 (`key_hash`) is kept, never the key itself."""

    key_id: str
    key_hash: str
    user_id: str
    role: Role
    labeler_group: str | None
    created_at: float
    revoked_at: float | None
    note: str

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def identity(self) -> Identity:
        """The caller this key authenticates."""
        return Identity(self.user_id, self.role, self.labeler_group)


@dataclass(frozen=True)
class Prompt:
    """A logged prompt. `text` is the plain prompt or the last user turn; `messages` the
    whole conversation (list of {"role", "content"}) when the prompt was a chat."""

    id: str
    user_id: str
    text: str
    messages: list[dict[str, str]] | None
    source: PromptSource
    split: Split
    dedup_key: str
    has_pii: bool
    redacted_text: str | None
    request_id: str | None
    created_at: float


@dataclass(frozen=True)
class NewCompletion:
    """A sample to log with `add_completions` (the store fills in ids and timestamps)."""

    idx: int
    text: str
    policy_version: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    sampling: dict[str, Any] = field(default_factory=dict)
    ttft_s: float | None = None
    purpose: CompletionPurpose = "serve"
    id: str | None = None
    has_pii: bool = False  # flagged at ingest (common.pii); `text` is then redacted in "redact" mode
    redacted_text: str | None = None
    # [version, start, end) token spans when a hot swap made this sample with two versions
    # (`policy_version` is then the first span's); empty when one version made it all.
    version_spans: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Completion:
    id: str
    prompt_id: str
    idx: int
    policy_version: int
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    sampling: dict[str, Any]
    latency_s: float
    ttft_s: float | None
    purpose: CompletionPurpose
    created_at: float
    has_pii: bool = False  # flagged at ingest (common.pii, the detector hygiene uses too)
    redacted_text: str | None = None
    version_spans: list[list[int]] | None = None  # [[version, start, end], ...]; None: one version

    @property
    def mixed_versions(self) -> bool:
        """Produced by two policy versions (a swap in "keep" mode): never one version's sample."""
        return bool(self.version_spans)


@dataclass(frozen=True)
class ComparisonTask:
    """A labeling lease: rank `completion_ids` of `prompt_id` before `expires_at`.

    `shown_at`: when the completions reached the labeler (None while they are sampled, and
    for tasks older than schema v6). A declined task carries its `decline_reason`
    ('skipped': no judgement; 'none_acceptable': a verdict on the completions, never a
    ranking, so nothing trains on it), the labeler's comment and when."""

    id: str
    prompt_id: str
    labeler_id: str
    k: int
    completion_ids: list[str]
    status: TaskStatus
    created_at: float
    expires_at: float
    shown_at: float | None = None
    decline_reason: DeclineReason | None = None
    decline_comment: str = ""
    declined_at: float | None = None

    def is_live(self, now: float) -> bool:
        """Still answerable: leased and not past its expiry (swept or not)."""
        return self.status == "leased" and now < self.expires_at


@dataclass(frozen=True)
class Ranking:
    """`ranking`: groups of completion ids, best group first; ids in one group are tied."""

    id: str
    prompt_id: str
    labeler_id: str
    labeler_group: str | None
    task_id: str | None
    ranking: list[list[str]]
    k: int
    source: FeedbackSource
    created_at: float


@dataclass(frozen=True)
class GoldRanking:
    """The operator's ranking of `completion_ids` (sorted) of a prompt: labelers given a
    task over exactly these completions are scored against it. Not training data."""

    prompt_id: str
    completion_ids: list[str]
    ranking: list[list[str]]
    set_by: str
    created_at: float


@dataclass(frozen=True)
class LabelRecord:
    """One ranking a labeler submitted (source 'label'), as labeler quality reads it:
    `seconds` from its task's shown_at to the ranking (None without a task or a shown_at)."""

    labeler_id: str
    labeler_group: str | None
    prompt_id: str
    ranking: list[list[str]]
    seconds: float | None


@dataclass(frozen=True)
class LabelerWork:
    """What labeler quality reads from the store: every labeling ranking, the declined
    tasks per labeler, each labeler's group from their users row, and the gold rankings."""

    rankings: list[LabelRecord]
    declined: dict[str, int]
    groups: dict[str, str | None]
    gold: list[GoldRanking]


@dataclass(frozen=True)
class VersionRatingCounts:
    """Ratings of one policy version's completions: how many, their mean Likert score and
    how many set each flag (name -> count)."""

    policy_version: int
    ratings: int
    mean_overall: float
    flag_counts: dict[str, int]


@dataclass(frozen=True)
class LabelerDay:
    """A labeler's work since `since` (unix seconds), and the prompts waiting for them
    (counted up to a cap)."""

    rankings: int
    declines: int
    demonstrations: int
    ratings: int
    queue_waiting: int


@dataclass(frozen=True)
class Demonstration:
    id: str
    prompt_id: str
    labeler_id: str
    labeler_group: str | None
    response: str
    source: FeedbackSource
    created_at: float


@dataclass(frozen=True)
class Rating:
    """Likert `overall` 1..7 and the paper's Table 3 metadata `flags` (name → bool)."""

    id: str
    completion_id: str
    labeler_id: str
    labeler_group: str | None
    overall: int
    flags: dict[str, bool]
    comment: str
    created_at: float


@dataclass(frozen=True)
class Policy:
    """A published checkpoint; `serving_since` is when it last started serving."""

    version: int
    path: str
    parent_version: int | None
    status: PolicyStatus
    created_at: float
    cycle_id: int | None
    metrics: dict[str, Any]
    serving_since: float | None


@dataclass(frozen=True)
class Cycle:
    """A training cycle; `metrics` is keyed by stage (snapshot, hygiene, sft, rm, ...)."""

    id: int
    state: CycleState
    stage: str | None
    trigger: str
    reason: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    base_version: int | None
    candidate_version: int | None
    metrics: dict[str, Any]
    error: str | None
    heartbeat_at: float | None
    owner_pid: int | None

    @property
    def finished(self) -> bool:
        return self.state in CYCLE_TERMINAL_STATES


@dataclass(frozen=True)
class IdempotentRecord:
    """The stored answer to (caller, method, request_id); `response` is the serialized
    response message, replayed verbatim on a retry with the same payload hash."""

    caller_id: str
    method: str
    request_id: str
    payload_sha256: str
    response: bytes
    created_at: float


@dataclass(frozen=True)
class IdempotentOutcome:
    """What `run_mutation` returns: the response bytes, and whether they were replayed
    from an earlier call (True) or produced now (False)."""

    response: bytes
    replayed: bool


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    user_id: str | None
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Stats:
    """Row counts and the serving version, field for field the `rlhf.v1.Stats` message
    (`serving_version` is None when nothing serves yet)."""

    serving_version: int | None
    users: int
    prompts: int
    completions: int
    rankings: int
    demonstrations: int
    ratings: int
    policies: int
    cycles: int
    prompts_by_split: dict[str, int]
    mixed_version_completions: int = 0  # produced by two versions (a swap in "keep" mode)


@dataclass(frozen=True)
class WriterStats:
    """Counters of the writer thread: committed transactions and ops, failed ops."""

    batches: int = 0
    ops_committed: int = 0
    ops_failed: int = 0
    largest_batch: int = 0
