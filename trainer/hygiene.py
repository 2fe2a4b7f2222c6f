"""Data hygiene, run at every cycle on a snapshot of the store's prompts (InstructGPT §3.2).

The pipeline, in the paper's order (``run_hygiene``):

1. ``dedup_by_prefix``: drop a prompt whose first ``prefix_chars`` normalised characters
   (NFKC, lower-cased, whitespace collapsed) equal those of an EARLIER prompt, from any
   user and any split, so a near-copy cannot sit in both train and test.
2. ``cap_per_user``: keep each user's ``max_per_user`` earliest prompts (the paper: 200).
3. ``assign_splits``: the split is a function of the user id (``common.identity``), so a
   user's prompts never straddle splits; disagreements with the split stored at arrival
   are reported and the recomputed split wins.
4. ``filter_pii``: prompts of the TRAIN split that contain PII are dropped or redacted;
   val/test are evaluation-only and left as stored.

Everything here is a pure function of plain records; the caller maps store rows to
``PromptRecord`` and writes flags back.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Literal, NamedTuple, Sequence

from common.identity import Split, split_for_user
from common.text import normalize_text

DEFAULT_PREFIX_CHARS = 64
PiiMode = Literal["drop", "redact"]
PII_MODES: tuple[str, ...] = ("drop", "redact")


@dataclass(frozen=True)
class PromptRecord:
    """A logged prompt as hygiene sees it. ``split`` is the one stored at arrival (or None)."""

    id: str
    user_id: str
    text: str
    created_at: float
    split: Split | None = None


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


# ---------------------------------------------------------------------------- PII detection

PiiKind = Literal["email", "iban", "card", "ssn", "nino", "ipv6", "ipv4", "phone"]

REDACTION_TOKENS: dict[str, str] = {
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "card": "[CARD]",
    "ssn": "[SSN]",
    "nino": "[NINO]",
    "ipv6": "[IP]",
    "ipv4": "[IP]",
    "phone": "[PHONE]",
}


class PiiMatch(NamedTuple):
    """One detected item: its kind and its [start, end) character span in the text."""

    kind: PiiKind
    span: tuple[int, int]


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def luhn_valid(number: str) -> bool:
    """The Luhn checksum of a digit string (payment cards): double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(s: str) -> bool:
    digits = _digits(s)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _iban_ok(s: str) -> bool:
    # ISO 13616: move the 4 leading characters to the end, letters -> 10..35, mod 97 == 1
    compact = s.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ipv6_ok(s: str) -> bool:
    # At least 3 hex groups: keeps "::", "::1" and C++'s "a::b" out; loopback is not PII anyway.
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return sum(1 for group in re.split(r"[:.]", s) if group) >= 3


def _phone_ok(s: str) -> bool:
    return 8 <= len(_digits(s)) <= 15  # E.164 has at most 15 digits


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# Detectors in priority order: a span claimed by an earlier kind is not matched again
# (an IBAN's digits are not also a card; a card's are not also a phone number).
_DETECTORS: tuple[tuple[PiiKind, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    (
        "email",
        re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"),
        None,
    ),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban_ok),
    # 13-19 digits, single spaces or hyphens allowed between them, not inside a longer digit
    # run nor a decimal or signed number; the first digit is 2-6 (every major network's
    # range: Mastercard 2/5, Amex/Diners/JCB 3, Visa 4, Discover/UnionPay/Maestro 6)
    ("card", re.compile(r"(?<![\d.,+])(?<!\d[ -])[2-6](?:[ -]?\d){12,18}(?![ -]?\d|[.,]\d)"), _card_ok),
    # US SSN: ddd-dd-dddd; area 000, 666 and 9xx, group 00 and serial 0000 are never issued
    ("ssn", re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"), None),
    # UK NINO: 2 letters (not D F I Q U V, second not O; BG GB KN NK NT TN ZZ unused),
    # 6 digits (optionally in pairs), suffix A-D
    (
        "nino",
        re.compile(
            r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
            r" ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b",
            re.IGNORECASE,
        ),
        None,
    ),
    (
        "ipv6",
        re.compile(
            r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
            r"(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)"
        ),
        _ipv6_ok,
    ),
    # dotted quad, not part of a longer dotted run (1.2.3.4.5) and no leading zeros (dates)
    ("ipv4", re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)"), None),
    # international: +CC then groups (the first 1-4 digits, later ones 2-5), 8-15 digits
    (
        "phone",
        re.compile(
            r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,4}(?:[ .-]?\d{2,5}){1,5}"
            r"(?![\w]|[.-]\d)"
        ),
        _phone_ok,
    ),
    # US: optional +1/1, area code (ddd) or ddd, then ddd and dddd, with separators
    (
        "phone",
        re.compile(
            r"(?<![\w+.-])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
            r"(?![\w]|[.-]\d)"
        ),
        None,
    ),
)


def find_pii(text: str) -> list[PiiMatch]:
    """Every PII item in ``text``, sorted by position, without overlaps.

    Kinds: emails; phone numbers (international ``+CC ...`` with 8-15 digits, US
    ``(ddd) ddd-dddd``/``ddd-ddd-dddd``/``ddd.ddd.dddd``, optionally ``+1``; a bare run of 10
    digits is NOT taken for a phone); payment cards (13-19 digits starting 2-6, spaces or
    hyphens allowed, Luhn-valid, not one repeated digit); IBANs (mod-97 checked); IPv4 and
    IPv6 addresses (IPv6 with at least 3 groups); national ids: US SSN ``ddd-dd-dddd`` and
    UK National Insurance numbers (any case, optionally spaced in pairs). Heuristics: a
    Luhn-valid 13-19 digit number (1 in 10 random ones) is taken for a card.
    """
    found: list[PiiMatch] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, check in _DETECTORS:
        for m in pattern.finditer(text):
            start, end = m.span()
            if any(start < e and s < end for s, e in taken):
                continue
            if check is not None and not check(m.group()):
                continue
            found.append(PiiMatch(kind, (start, end)))
            taken.append((start, end))
    return sorted(found, key=lambda m: m.span)


def redact_pii(text: str) -> str:
    """``text`` with every PII item replaced by its token (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ...)."""
    for kind, (start, end) in reversed(find_pii(text)):
        text = text[:start] + REDACTION_TOKENS[kind] + text[end:]
    return text


def filter_pii(
    prompts: Sequence[PromptRecord], mode: PiiMode = "drop"
) -> tuple[list[PromptRecord], list[str]]:
    """Drop (or redact) the TRAIN-split prompts that contain PII; other splits pass untouched.

    Returns the survivors in input order and the ids of the train prompts found with PII.
    """
    if mode not in PII_MODES:
        raise ValueError(f"Unknown PII mode: {mode}")
    kept, flagged = [], []
    for p in prompts:
        if p.split != "train" or not find_pii(p.text):
            kept.append(p)
            continue
        flagged.append(p.id)
        if mode == "redact":
            kept.append(replace(p, text=redact_pii(p.text)))
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
    kept, pii_ids = filter_pii(split, config.pii_mode)
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
