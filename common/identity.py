"""Who is calling, and which data split their prompts belong to.

The server authenticates every call by an API key (`generate_api_key`, stored only as
`hash_api_key`) and turns it into an `Identity`. The train/val/test split is decided by
user id (the paper splits BY USER, so no user's prompts leak across splits); the server,
when it logs a prompt, and the trainer, when it checks its data, both call
`split_for_user`, so the assignment must be a pure function of the id.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal["user", "labeler", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)

API_KEY_PREFIX = "rlhf_"
API_KEY_BYTES = 32


@dataclass(frozen=True)
class Identity:
    """An authenticated caller. `labeler_group` is set for labelers only (held-out groups
    let evaluation measure how the RM generalises to labelers it never trained on)."""

    user_id: str
    role: Role
    labeler_group: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Unknown role: {self.role!r} (expected one of {ROLES})")
        if not self.user_id:
            raise ValueError("Identity needs a non-empty user_id")


def generate_api_key() -> str:
    """A new random API key: `rlhf_` + 32 random bytes, urlsafe base64 (43 characters)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_BYTES)


def hash_api_key(key: str) -> str:
    """The sha256 hex digest under which a key is stored and looked up.

    A fast unsalted hash is right here, unlike for passwords: keys carry 256 bits of
    randomness, so neither brute force nor precomputed tables can invert the digest, and a
    deterministic digest lets the server find a key with one indexed lookup per call.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def unit_interval_hash(text: str) -> float:
    """Map `text` to [0, 1) by the first 8 bytes of its sha256: stable across processes,
    machines and Python versions (unlike the salted built-in `hash()`)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_for_user(user_id: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """The split every prompt of `user_id` belongs to: [0, val) → val, [val, val+test) →
    test, the rest → train, on `unit_interval_hash(user_id)`."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"Invalid split fractions: val={val_fraction}, test={test_fraction}")
    u = unit_interval_hash(user_id)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"
