"""Data hygiene, run at every cycle on a snapshot of the store's prompts (InstructGPT §3.2).

The pipeline, in the paper's order (``run_hygiene``):

1. ``dedup_by_prefix``: drop a prompt whose first ``prefix_chars`` normalised characters
   (NFKC, lower-cased, whitespace collapsed) equal those of an EARLIER prompt, from any
   user and any split, so a near-copy cannot sit in both train and test.
2. ``cap_per_user``: keep each user's ``max_per_user`` earliest prompts (the paper: 200).
3. ``assign_splits``: the split is a function of the user id (``common.identity``), so a
   user's prompts never straddle splits; disagreements with the split stored at arrival
   are reported and the recomputed split wins.
4. ``filter_pii``: prompts of the TRAIN split with PII are dropped or redacted (every
   chat turn); val/test are evaluation-only and left as stored. A prompt has PII when the
   server flagged it at ingest or the detector (``common.pii``, the server's too) finds
   some in its text or in ANY turn of its chat (system, user, assistant).

Everything here is a pure function of plain records; the caller maps store rows to
``PromptRecord`` and writes flags back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Literal, Sequence

from common.identity import Split, split_for_user
from common.pii import (
    DEFAULT_PHONE_REGION,
    check_phone_region,
    find_pii,
    messages_have_pii,
    redact_messages,
    redact_pii,
)
from common.text import normalize_text

DEFAULT_PREFIX_CHARS = 64
PiiMode = Literal["drop", "redact"]
PII_MODES: tuple[str, ...] = ("drop", "redact")


@dataclass(frozen=True)
class PromptRecord:
    """A logged prompt as hygiene sees it. ``split`` is the one stored at arrival (or None);
    ``messages`` the whole chat when it was one (``text`` is then its last user turn);
    ``has_pii`` the server's flag at ingest."""

    id: str
    user_id: str
    text: str
    created_at: float
    split: Split | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    has_pii: bool = False


def _chronological(prompts: Sequence[PromptRecord]) -> list[int]:
    """Indices of ``prompts`` by created_at; ties keep input order (sort is stable)."""
    return sorted(range(len(prompts)), key=lambda i: prompts[i].created_at)


# ---------------------------------------------------------------------------- dedup and cap


def dedup_key(text: str, prefix_chars: int = DEFAULT_PREFIX_CHARS) -> str:
    """The first ``prefix_chars`` normalised characters: prompts with equal keys are duplicates.

    Two prompts collide when they share a normalised prefix of at least ``prefix_chars``
    characters, or are equal after normalisation when shorter than that.
    """
    return normalize_text(text)[:prefix_chars]


def dedup_by_prefix(
    prompts: Sequence[PromptRecord], prefix_chars: int = DEFAULT_PREFIX_CHARS
) -> list[PromptRecord]:
    """Drop every prompt whose ``dedup_key`` equals that of an earlier one (by created_at).

    Survivors keep their input order.
    """
    seen: set[str] = set()
    keep: set[int] = set()
    for i in _chronological(prompts):
        key = dedup_key(prompts[i].text, prefix_chars)
        if key not in seen:
            seen.add(key)
            keep.add(i)
    return [p for i, p in enumerate(prompts) if i in keep]


def cap_per_user(prompts: Sequence[PromptRecord], max_per_user: int = 200) -> list[PromptRecord]:
    """Keep each user's ``max_per_user`` earliest prompts. Survivors keep their input order."""
    taken: dict[str, int] = {}
    keep: set[int] = set()
    for i in _chronological(prompts):
        user = prompts[i].user_id
        if taken.get(user, 0) < max_per_user:
            taken[user] = taken.get(user, 0) + 1
            keep.add(i)
    return [p for i, p in enumerate(prompts) if i in keep]


# ---------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitDisagreement:
    """A prompt whose stored split differs from the one its user id hashes to."""

    prompt_id: str
    user_id: str
    stored: str
    computed: str


def assign_splits(
    prompts: Sequence[PromptRecord], val_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[list[PromptRecord], list[SplitDisagreement]]:
    """Set every prompt's split from its user id; report where the stored split disagreed.

    A prompt stored without a split (None) is assigned silently.
    """
    assigned, disagreements = [], []
    for p in prompts:
        split = split_for_user(p.user_id, val_fraction=val_fraction, test_fraction=test_fraction)
        if p.split is not None and p.split != split:
            disagreements.append(SplitDisagreement(p.id, p.user_id, p.split, split))
        assigned.append(p if p.split == split else replace(p, split=split))
    return assigned, disagreements


# ---------------------------------------------------------------------------- PII


def holds_pii(p: PromptRecord, region: str = DEFAULT_PHONE_REGION) -> bool:
    """Flagged at ingest, or PII found now in its text or ANY turn of its chat."""
    return p.has_pii or bool(find_pii(p.text, region)) or messages_have_pii(p.messages or (), region)


def redact_record(p: PromptRecord, region: str = DEFAULT_PHONE_REGION) -> PromptRecord:
    """The prompt with every PII item of its text and of every chat turn replaced by a token."""
    messages = None if p.messages is None else tuple(redact_messages(p.messages, region))
    return replace(p, text=redact_pii(p.text, region), messages=messages)


def filter_pii(
    prompts: Sequence[PromptRecord], mode: PiiMode = "drop", region: str = DEFAULT_PHONE_REGION
) -> tuple[list[PromptRecord], list[str]]:
    """Drop (or redact) the TRAIN-split prompts with PII (``holds_pii``: the ingest flag or
    any turn); other splits pass untouched.

    Returns the survivors in input order and the ids of the train prompts found with PII.
    """
    if mode not in PII_MODES:
        raise ValueError(f"Unknown PII mode: {mode}")
    kept, flagged = [], []
    for p in prompts:
        if p.split != "train" or not holds_pii(p, region):
            kept.append(p)
            continue
        flagged.append(p.id)
        if mode == "redact":
            kept.append(redact_record(p, region))
    return kept, flagged


# ---------------------------------------------------------------------------- the pipeline


@dataclass
class HygieneConfig:
    """How a cycle cleans its prompts (defaults follow the paper)."""

    prefix_chars: int = field(
        default=DEFAULT_PREFIX_CHARS,
        metadata={"help": "A prompt whose first N normalised characters equal an earlier one's is a duplicate."},
    )
    max_per_user: int = field(
        default=200, metadata={"help": "At most this many prompts per user id (earliest kept)."}
    )
    pii_mode: PiiMode = field(
        default="drop",
        metadata={"help": "A train-split prompt with PII: 'drop' it, or 'redact' each item to a token."},
    )
    phone_region: str = field(
        default=DEFAULT_PHONE_REGION,
        metadata={"help": "Region (ISO 3166 alpha-2) whose national phone formats count as PII (+cc numbers always do)."},
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "Share of user ids in the validation split (must match the server's)."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Share of user ids in the test split (must match the server's)."}
    )

    def __post_init__(self) -> None:
        if self.prefix_chars <= 0:
            raise ValueError(f"prefix_chars must be > 0, got {self.prefix_chars}")
        if self.max_per_user < 1:
            raise ValueError(f"max_per_user must be >= 1, got {self.max_per_user}")
        if self.pii_mode not in PII_MODES:
            raise ValueError(f"Unknown PII mode: {self.pii_mode}")
        check_phone_region(self.phone_region)
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"Invalid split fractions: val={self.val_fraction}, test={self.test_fraction}")


@dataclass
class HygieneReport:
    """What one hygiene pass did. ``n_input == n_kept + n_duplicates + n_over_user_cap + n_pii_dropped``."""

    n_input: int
    n_kept: int
    n_duplicates: int
    n_over_user_cap: int
    n_pii_dropped: int
    n_pii_redacted: int
    kept_by_split: dict[str, int]
    split_disagreements: list[SplitDisagreement]
    pii_prompt_ids: list[str]  # train prompts found with PII (dropped or redacted)

    @property
    def n_removed(self) -> int:
        return self.n_duplicates + self.n_over_user_cap + self.n_pii_dropped

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _count_splits(prompts: Iterable[PromptRecord]) -> dict[str, int]:
    counts = {"train": 0, "val": 0, "test": 0}
    for p in prompts:
        counts[str(p.split)] = counts.get(str(p.split), 0) + 1
    return counts


def run_hygiene(
    prompts: Sequence[PromptRecord], config: HygieneConfig
) -> tuple[list[PromptRecord], HygieneReport]:
    """Dedup, cap per user, assign splits by user, filter PII from train; see the module doc."""
    deduped = dedup_by_prefix(prompts, config.prefix_chars)
    capped = cap_per_user(deduped, config.max_per_user)
    split, disagreements = assign_splits(capped, config.val_fraction, config.test_fraction)
    kept, pii_ids = filter_pii(split, config.pii_mode, config.phone_region)
    report = HygieneReport(
        n_input=len(prompts),
        n_kept=len(kept),
        n_duplicates=len(prompts) - len(deduped),
        n_over_user_cap=len(deduped) - len(capped),
        n_pii_dropped=len(split) - len(kept),
        n_pii_redacted=len(pii_ids) if config.pii_mode == "redact" else 0,
        kept_by_split=_count_splits(kept),
        split_disagreements=disagreements,
        pii_prompt_ids=pii_ids,
    )
    return kept, report
