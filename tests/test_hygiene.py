"""trainer.hygiene on small literal inputs with the survivors written out."""

from __future__ import annotations

import json
from functools import cache

import pytest

from common.identity import split_for_user
from common.pii import find_pii, luhn_valid, redact_pii
from trainer.hygiene import (
    DEFAULT_PREFIX_CHARS,
    HygieneConfig,
    PromptRecord,
    SplitDisagreement,
    assign_splits,
    cap_per_user,
    dedup_by_prefix,
    dedup_key,
    filter_pii,
    run_hygiene,
)


@cache
def user_in(split: str, n: int = 0) -> str:
    """The n-th id of the form user-<i> that hashes to ``split`` (found, not hard-coded)."""
    found = [f"user-{i}" for i in range(1000) if split_for_user(f"user-{i}") == split]
    return found[n]


def rec(id: str, text: str, created_at: float, user_id: str = "u", split=None) -> PromptRecord:
    return PromptRecord(id=id, user_id=user_id, text=text, created_at=created_at, split=split)


def ids(prompts) -> list[str]:
    return [p.id for p in prompts]


# ---------------------------------------------------------------------------- dedup


def test_dedup_key_normalises_case_and_whitespace():
    assert dedup_key("  Hello\t\nWORLD  again ", prefix_chars=11) == "hello world"
    assert dedup_key("Ｈｉ") == "hi"  # NFKC folds full-width letters


def test_dedup_drops_later_prompt_sharing_prefix():
    prompts = [
        rec("late", "  WRITE a poem   about the sea and sky", created_at=2.0, user_id="b"),
        rec("early", "Write a poem about the sea, please", created_at=1.0, user_id="a"),
        rec("other", "Write a story about the sea", created_at=3.0),
    ]
    # prefix 12: "write a poem" is shared by "late" and "early"; "early" came first
    assert ids(dedup_by_prefix(prompts, prefix_chars=12)) == ["early", "other"]
    # prefix 20: "write a poem about t" still shared; prefix 30 is past where they differ
    assert ids(dedup_by_prefix(prompts, prefix_chars=20)) == ["early", "other"]
    assert ids(dedup_by_prefix(prompts, prefix_chars=30)) == ["late", "early", "other"]


def test_dedup_short_prompts_only_when_equal():
    prompts = [rec("1", "hi", 1.0), rec("2", "Hi ", 2.0), rec("3", "hi there", 3.0)]
    # keys "hi", "hi", "hi there": "2" is a copy of "1"; "3" shares only 2 characters
    assert ids(dedup_by_prefix(prompts, prefix_chars=10)) == ["1", "3"]


def test_dedup_default_prefix_is_64_characters():
    assert DEFAULT_PREFIX_CHARS == 64
    base = "x" * 63
    prompts = [
        rec("a", base + "A and then one thing", 1.0),
        rec("b", base + "a and then another", 2.0),  # same 64 chars after case folding
        rec("c", base + "B", 3.0),  # differs at character 64
    ]
    assert ids(dedup_by_prefix(prompts)) == ["a", "c"]


# ---------------------------------------------------------------------------- cap per user


def test_cap_per_user_keeps_earliest_in_input_order():
    prompts = [
        rec("a3", "x", 3.0, user_id="a"),
        rec("b1", "x", 1.5, user_id="b"),
        rec("a1", "x", 1.0, user_id="a"),
        rec("a2", "x", 2.0, user_id="a"),
    ]
    # user a's two earliest are a1 (t=1) and a2 (t=2); a3 (t=3) goes
    assert ids(cap_per_user(prompts, max_per_user=2)) == ["b1", "a1", "a2"]
    assert ids(cap_per_user(prompts, max_per_user=1)) == ["b1", "a1"]
    assert len(cap_per_user(prompts)) == 4  # default 200


# ---------------------------------------------------------------------------- splits


def test_assign_splits_by_user_and_reports_disagreements():
    train, val, test = user_in("train"), user_in("val"), user_in("test")
    prompts = [
        rec("p1", "x", 1.0, user_id=train, split="train"),  # agrees
        rec("p2", "y", 2.0, user_id=train, split="test"),  # stored wrong
        rec("p3", "z", 3.0, user_id=val, split=None),  # never stored: assigned silently
        rec("p4", "w", 4.0, user_id=test, split="test"),
    ]
    assigned, disagreements = assign_splits(prompts)
    assert [p.split for p in assigned] == ["train", "train", "val", "test"]
    assert disagreements == [SplitDisagreement("p2", train, stored="test", computed="train")]
    assert ids(assigned) == ["p1", "p2", "p3", "p4"]


# ---------------------------------------------------------------------------- PII


@pytest.mark.parametrize(
    ("text", "kind", "found"),
    [
        ("mail me at John.Doe+tag@example.co.uk please", "email", "John.Doe+tag@example.co.uk"),
        ("call +44 20 7946 0958 now", "phone", "+44 20 7946 0958"),
        ("my cell: +33 1 23 45 67 89", "phone", "+33 1 23 45 67 89"),
        ("ring +4915112345678", "phone", "+4915112345678"),
        ("office (555) 123-4567.", "phone", "(555) 123-4567"),
        ("or 555-123-4567", "phone", "555-123-4567"),
        ("or 555.123.4567", "phone", "555.123.4567"),
        ("toll free 1-800-555-0199", "phone", "1-800-555-0199"),
        ("us +1 (555) 123-4567", "phone", "+1 (555) 123-4567"),
        ("visa 4111 1111 1111 1111 exp 12/27", "card", "4111 1111 1111 1111"),  # Luhn: 30 % 10 == 0
        ("visa 4111-1111-1111-1111", "card", "4111-1111-1111-1111"),
        ("pay 4111111111111111", "card", "4111111111111111"),
        ("amex 3782 822463 10005", "card", "3782 822463 10005"),  # 15 digits in 4-6-5
        ("iban GB82 WEST 1234 5698 7654 32 thanks", "iban", "GB82 WEST 1234 5698 7654 32"),
        ("server 192.168.1.10.", "ipv4", "192.168.1.10"),
        ("v6 2001:db8::8a2e:370:7334 ok", "ipv6", "2001:db8::8a2e:370:7334"),
        ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "ipv6", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ("ssn 123-45-6789", "ssn", "123-45-6789"),
        ("nino AB 12 34 56 C", "nino", "AB 12 34 56 C"),
        ("nino ab123456c", "nino", "ab123456c"),
    ],
)
def test_find_pii_positives(text, kind, found):
    matches = find_pii(text)
    assert [(m.kind, text[m.span[0] : m.span[1]]) for m in matches] == [(kind, found)]


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # 16 digits, Luhn sum 31: not a card (nor a phone)
        "4111111111111112",
        "0000 0000 0000 0000",  # Luhn-valid but one repeated digit
        "timestamp 1700000000123",  # 13 digits starting with 1: no card network
        "pi is 3.14159265358979",
        "release 1.2.3.4.5 is out",  # version, not an IP
        "version 10.2.3",
        "on 01.02.2024 and 2024-01-15",  # dates
        "192.168.1.1000",  # last octet > 255
        "at 12:30:45 sharp",  # a time is not IPv6
        "use std::vector and ::1",
        "mac 00:1A:2B:3C:4D:5E",
        "order 5551234567",  # bare 10 digits: not taken for a phone
        "x = 3+4, +1234",
        "isbn 978-0-306-40615-7",
        "price $1,234,567.89",
        "ssn 000-12-3456",  # area 000 is never issued
        "QQ123456C",  # HMRC's specimen prefix: Q is not used
        "GB00WEST12345698765432",  # IBAN checksum fails
        "user@localhost",
        "Explain Bayes' theorem in 3 sentences.",
    ],
)
def test_find_pii_negatives(text):
    assert find_pii(text) == []


@pytest.mark.parametrize(
    ("text", "kind", "found"),
    [
        ("call +44 (0)20 7946 0958", "phone", "+44 (0)20 7946 0958"),  # libphonenumber reads the (0)
        ("ring 011 49 151 12345678", "phone", "011 49 151 12345678"),  # the US exit code, then +49
        ("fax +49 (30) 1234567", "phone", "+49 (30) 1234567"),
        ("iban DE89 3704 0044 0532 0130 00", "iban", "DE89 3704 0044 0532 0130 00"),
        ("card 5555 5555 5555 4444", "card", "5555 5555 5555 4444"),
    ],
)
def test_find_pii_more_positives(text, kind, found):
    assert [(m.kind, text[m.span[0] : m.span[1]]) for m in find_pii(text)] == [(kind, found)]


@pytest.mark.parametrize(
    "text",
    [
        "ISBN 0-306-40615-2",  # 10 digits, but not grouped as a US number
        "part no. 12-3456-7890",
        "call 555-0100",  # 7 digits: a local number is not taken
        "call 020 7946 0958",  # a UK national number: not a US one
    ],
)
def test_find_pii_more_negatives(text):
    assert find_pii(text) == []


def test_phone_region_decides_which_national_numbers_count():
    assert [m.kind for m in find_pii("call 020 7946 0958", region="GB")] == ["phone"]
    assert find_pii("call 020 7946 0958", region="US") == []
    with pytest.raises(ValueError, match="Unknown phone region: 'XX'"):
        HygieneConfig(phone_region="XX")


def test_luhn():
    # 4111 1111 1111 1111: doubling every second digit from the right: 8+1+2+1+... = 30
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert luhn_valid("79927398713")  # the textbook example


def test_redact_pii_replaces_every_item():
    text = "Email a.b@x.org or call 555-123-4567; card 4111 1111 1111 1111, host 10.0.0.1."
    assert redact_pii(text) == "Email [EMAIL] or call [PHONE]; card [CARD], host [IP]."
    assert redact_pii("nothing here") == "nothing here"


def test_filter_pii_touches_train_split_only():
    prompts = [
        rec("t-clean", "summarise this", 1.0, split="train"),
        rec("t-pii", "write to me at bob@example.com", 2.0, split="train"),
        rec("v-pii", "write to me at eve@example.com", 3.0, split="val"),
    ]
    kept, flagged = filter_pii(prompts, mode="drop")
    assert ids(kept) == ["t-clean", "v-pii"]
    assert flagged == ["t-pii"]
    kept, flagged = filter_pii(prompts, mode="redact")
    assert [p.text for p in kept] == ["summarise this", "write to me at [EMAIL]", "write to me at eve@example.com"]
    assert flagged == ["t-pii"]
    with pytest.raises(ValueError, match="Unknown PII mode: erase"):
        filter_pii(prompts, mode="erase")


def test_filter_pii_honours_the_ingest_flag_and_every_chat_turn():
    chat = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "I'm at 10.0.0.7, call +1 212 555 0142"},
            {"role": "assistant", "content": "OK."}, {"role": "user", "content": "Now what?"})  # fmt: skip
    prompts = [
        PromptRecord("flagged", "u", "looks clean", 1.0, "train", has_pii=True),  # the server found some
        PromptRecord("earlier-turn", "u", "Now what?", 2.0, "train", messages=chat),
        PromptRecord("clean-chat", "u", "Now what?", 3.0, "train", messages=(chat[0], chat[3])),
    ]
    kept, flagged = filter_pii(prompts, mode="drop")
    assert ids(kept) == ["clean-chat"] and flagged == ["flagged", "earlier-turn"]
    kept, _ = filter_pii(prompts, mode="redact")
    assert [m["content"] for m in kept[1].messages] == ["Be brief.", "I'm at [IP], call [PHONE]", "OK.", "Now what?"]
    assert kept[0].text == "looks clean"  # flagged, but nothing left to redact: kept as is


# ---------------------------------------------------------------------------- pipeline


def _snapshot() -> list[PromptRecord]:
    a, b, v = user_in("train", 0), user_in("train", 1), user_in("val")
    return [
        rec("a1", "Tell me a joke about cats", 1.0, a, "train"),
        rec("a2", "tell me   a JOKE about cats and dogs", 2.0, a, "train"),  # dup of a1 (prefix 16)
        rec("a3", "Plan a trip to Rome", 3.0, a, "train"),
        rec("a4", "Translate 'bonjour' to English", 4.0, a, "train"),  # a's 3rd survivor: over cap 2
        rec("b1", "My email is bob@example.com, fix my CV", 5.0, b, "train"),  # PII in train
        rec("b2", "Tell me a joke about cats!", 6.0, b, "train"),  # dup of a1, other user
        rec("v1", "Mail eve@example.com about the meeting", 7.0, v, "train"),  # stored wrong; val
    ]


def test_run_hygiene_drop_counts_add_up():
    config = HygieneConfig(prefix_chars=16, max_per_user=2, pii_mode="drop")
    kept, report = run_hygiene(_snapshot(), config)
    # dedup removes a2, b2; cap removes a4 (a keeps a1, a3); PII drops b1 (train); v1 is val
    assert ids(kept) == ["a1", "a3", "v1"]
    assert (report.n_duplicates, report.n_over_user_cap, report.n_pii_dropped) == (2, 1, 1)
    assert report.n_pii_redacted == 0
    assert report.n_kept + report.n_removed == report.n_input == 7
    assert report.kept_by_split == {"train": 2, "val": 1, "test": 0}
    assert [d.prompt_id for d in report.split_disagreements] == ["v1"]
    assert report.pii_prompt_ids == ["b1"]
    assert json.loads(report.to_json())["split_disagreements"][0]["computed"] == "val"


def test_run_hygiene_redact_keeps_prompt_with_tokens():
    config = HygieneConfig(prefix_chars=16, max_per_user=2, pii_mode="redact")
    kept, report = run_hygiene(_snapshot(), config)
    assert ids(kept) == ["a1", "a3", "b1", "v1"]
    assert kept[2].text == "My email is [EMAIL], fix my CV"
    assert kept[3].text == "Mail eve@example.com about the meeting"  # val is not filtered
    assert (report.n_pii_dropped, report.n_pii_redacted) == (0, 1)
    assert report.n_kept + report.n_removed == report.n_input


def test_run_hygiene_empty_snapshot():
    kept, report = run_hygiene([], HygieneConfig())
    assert kept == [] and report.n_input == report.n_kept == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"prefix_chars": 0}, {"max_per_user": 0}, {"pii_mode": "erase"}, {"val_fraction": 0.6, "test_fraction": 0.5}],
)
def test_hygiene_config_validates(kwargs):
    with pytest.raises(ValueError):
        HygieneConfig(**kwargs)
