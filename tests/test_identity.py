"""Tests of common/identity.py: keys, identities and the by-user split."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from common.identity import (
    API_KEY_PREFIX,
    Identity,
    generate_api_key,
    hash_api_key,
    split_for_user,
    unit_interval_hash,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_generated_keys_have_prefix_and_256_bits_and_differ() -> None:
    keys = {generate_api_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith(API_KEY_PREFIX)
        # 32 bytes in urlsafe base64 without padding: ceil(32 * 4 / 3) = 43 characters.
        assert len(key) == len(API_KEY_PREFIX) + 43
        assert set(key[len(API_KEY_PREFIX) :]) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_hash_api_key_is_sha256_hex() -> None:
    # sha256("abc") is the FIPS 180-2 test vector.
    assert hash_api_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    key = generate_api_key()
    assert hash_api_key(key) == hash_api_key(key)
    assert hash_api_key(key) != hash_api_key(key + "x")


def test_identity_is_frozen_and_validates_role() -> None:
    ident = Identity("u1", "labeler", "group-a")
    with pytest.raises(AttributeError):
        ident.role = "admin"  # type: ignore[misc]
    with pytest.raises(ValueError, match="Unknown role"):
        Identity("u1", "root")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Identity("", "user")


def test_unit_interval_hash_is_first_8_bytes_of_sha256() -> None:
    # sha256("alice") starts 2bd806c97f0e00af; 0x2bd806c97f0e00af / 2**64 = 0.17126...
    assert unit_interval_hash("alice") == pytest.approx(0x2BD806C97F0E00AF / 2.0**64)


# Computed once with this implementation. They pin the hash: if these change, every
# stored prompt's split disagrees with what the trainer recomputes, and users would
# leak between train and evaluation data. Changing the function is a data migration.
PINNED_SPLITS = {
    "alice": "test",  # u = 0.1713: in [0.1, 0.2)
    "heidi": "val",  # u = 0.0220: below 0.1
    "user-7": "val",  # u = 0.0357
    "user-9": "val",  # u = 0.0801
    "bob": "train",  # u = 0.5067
    "grace": "train",  # u = 0.8753
}


def test_split_for_user_matches_pinned_values() -> None:
    assert {uid: split_for_user(uid) for uid in PINNED_SPLITS} == PINNED_SPLITS


def test_split_for_user_is_the_same_in_another_process() -> None:
    ids = [f"user-{i}" for i in range(200)] + list(PINNED_SPLITS)
    script = (
        "import json, sys\n"
        "from common.identity import split_for_user\n"
        "print(json.dumps([split_for_user(u) for u in json.loads(sys.argv[1])]))\n"
    )
    # A different hash seed: a split built on Python's hash() would change here.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(ids)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert json.loads(out.stdout) == [split_for_user(u) for u in ids]


def test_split_fractions_roughly_match_over_10k_ids() -> None:
    counts = Counter(
        split_for_user(hashlib.md5(str(i).encode()).hexdigest()) for i in range(10_000)
    )
    # Binomial(10k, 0.1) has sd 30: 5 sd is ±150, so these bounds fail only on a bug.
    assert 850 <= counts["val"] <= 1150
    assert 850 <= counts["test"] <= 1150
    assert counts["train"] == 10_000 - counts["val"] - counts["test"]


def test_split_for_user_respects_custom_fractions_and_rejects_bad_ones() -> None:
    assert {split_for_user(f"u{i}", 0.0, 0.0) for i in range(200)} == {"train"}
    assert {split_for_user(f"u{i}", 1.0, 0.0) for i in range(200)} == {"val"}
    with pytest.raises(ValueError, match="Invalid split fractions"):
        split_for_user("u", 0.6, 0.6)
    with pytest.raises(ValueError):
        split_for_user("u", -0.1, 0.1)
