"""PII detection and redaction: ONE detector, for the server (flagging every prompt and
completion as it is logged) and the trainer (data hygiene on a snapshot).

Detected (``find_pii``), in this priority order (a span claimed by an earlier kind is not
matched again: an IBAN's digits are not also a card, a card's not also a phone number):

- ``email``: local@domain.tld (a dotted domain with a 2+ letter TLD; ``user@localhost`` is not);
- ``iban``: 2 letters, 2 check digits, 11-30 more characters, spaced in fours or not,
  valid per ``stdnum.iban`` (mod-97 checksum AND the country's BBAN format);
- ``card``: payment cards, 13-19 digits starting 2-6 (every major network), single spaces
  or hyphens allowed, Luhn-valid (``stdnum.luhn``), not one repeated digit. A heuristic:
  one random 13-19 digit number in 10 passes Luhn;
- ``ssn``: US SSN ``ddd-dd-dddd`` (area 000/666/9xx, group 00, serial 0000 excluded);
- ``nino``: UK National Insurance numbers, any case, optionally spaced in pairs;
- ``ipv6`` (at least 3 groups, so ``::1`` and C++'s ``a::b`` stay out; checked with
  ``ipaddress``) and ``ipv4`` (dotted quads of octets 0-255; not part of a longer dotted
  run, no leading zeros);
- ``phone``: Google's libphonenumber (``phonenumbers.PhoneNumberMatcher``, leniency
  POSSIBLE, so fictional numbers such as 555-01xx count): international ``+cc`` numbers
  of any country, and national numbers of ``region`` (default "US"; the server's
  ``pii_phone_region`` and the trainer's ``cycle.hygiene.phone_region``). Our guards on
  top: at least 8 digits written (7-digit local numbers are NOT taken) and at most 15 in
  E.164 form; a national number must be written in the region's own grouping, e.g.
  ``(555) 123-4567``, ``555.123.4567``, ``1-800-555-0199`` in the US (so a bare run of
  digits such as an order number, ``12-3456-7890``, an ISBN or an IP is not a phone);
  an international one (``+cc``, or the region's exit code such as ``011`` in the US)
  needs no particular grouping.

Not detected: names, postal addresses, dates of birth, MAC addresses, passport and
driving-licence numbers, national ids other than the US SSN and UK NINO, national phone
numbers of regions other than ``region``, numbers spelled out in words or obfuscated
("john at example dot com").

Pure functions of text; no store, no config objects.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Callable, Literal, NamedTuple

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn as stdnum_luhn

PiiKind = Literal["email", "iban", "card", "ssn", "nino", "ipv6", "ipv4", "phone"]
DEFAULT_PHONE_REGION = "US"

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


def check_phone_region(region: str) -> str:
    """``region`` if libphonenumber knows it (ISO 3166 alpha-2, e.g. "US", "GB"), else ValueError."""
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"Unknown phone region: {region!r} (an ISO 3166 alpha-2 code libphonenumber supports, e.g. 'US')")
    return region


def luhn_valid(number: str) -> bool:
    """The Luhn checksum of a digit string (payment cards), by ``stdnum.luhn``."""
    return stdnum_luhn.is_valid(number)


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _card_ok(s: str) -> bool:
    digits = _digits(s)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits)


def _ipv6_ok(s: str) -> bool:
    # At least 3 hex groups: keeps "::", "::1" and C++'s "a::b" out; loopback is not PII anyway.
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return sum(1 for group in re.split(r"[:.]", s) if group) >= 3


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# The regex-found kinds, in priority order; each with its check (None: the pattern suffices).
_REGEX_DETECTORS: tuple[tuple[PiiKind, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    (
        "email",
        re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"),
        None,
    ),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), stdnum_iban.is_valid),
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
)

_DIGIT = re.compile(r"\d")
# What each kind cannot match without: "@", two colons, or a digit.
_NEEDS: dict[str, str] = {"email": "@", "ipv6": ":", "iban": "digit", "card": "digit", "ssn": "digit",
                          "nino": "digit", "ipv4": "digit"}

# Cheap gate before libphonenumber (pure Python, the detector's costly part): 8 digits with
# only separators between them, or the matcher cannot find a number we would accept.
_PHONE_GATE = re.compile(r"\d(?:[\s().-]{0,3}\d){7}")


def _phone_ok(match: phonenumbers.PhoneNumberMatch, text: str, region: str) -> bool:
    """Our guards on a libphonenumber match (module docstring)."""
    raw, start, end = match.raw_string, match.start, match.end
    e164_digits = len(str(match.number.country_code)) + len(str(match.number.national_number))
    if len(_digits(raw)) < 8 or e164_digits > 15:
        return False
    if re.search(r"\d[.-]$", text[max(0, start - 2) : start]) or re.match(r"[.-]\d", text[end : end + 2]):
        return False  # inside a longer dotted or hyphenated run of numbers
    if raw.startswith("+") or match.number.country_code != phonenumbers.country_code_for_region(region):
        return True  # international: "+cc ..." or the region's exit code ("011 49 ...")
    # National: written in the region's own grouping, e.g. (555) 123-4567 or 555-123-4567 in
    # the US (a trunk prefix such as 1- may lead), so neither a bare run of digits (an order
    # number) nor 12-3456-7890 or an ISBN's 0-306-40615-2 passes.
    want = re.findall(r"\d+", phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.NATIONAL))
    got = re.findall(r"\d+", raw)
    return len(got) > 1 and got[-len(want) :] == want


def _phone_spans(text: str, region: str) -> list[tuple[int, int]]:
    if not _PHONE_GATE.search(text):
        return []
    matcher = phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE)
    return [(m.start, m.end) for m in matcher if _phone_ok(m, text, region)]


def find_pii(text: str, region: str = DEFAULT_PHONE_REGION) -> list[PiiMatch]:
    """Every PII item in ``text`` (kinds and limits: the module docstring), sorted by
    position, without overlaps. ``region``: whose national phone formats count."""
    found: list[PiiMatch] = []
    taken: list[tuple[int, int]] = []

    def claim(kind: PiiKind, start: int, end: int) -> None:
        if not any(start < e and s < end for s, e in taken):
            found.append(PiiMatch(kind, (start, end)))
            taken.append((start, end))

    # Each pattern costs ~10-20 us per 500 characters even when nothing matches (a scan
    # with lookbehinds at every position): skip those whose required character is absent.
    present = {"@": "@" in text, ":": text.count(":") >= 2, "digit": _DIGIT.search(text) is not None}
    for kind, pattern, check in _REGEX_DETECTORS:
        if not present[_NEEDS[kind]]:
            continue
        for m in pattern.finditer(text):
            if check is None or check(m.group()):
                claim(kind, *m.span())
    if present["digit"]:
        for start, end in _phone_spans(text, region):
            claim("phone", start, end)
    return sorted(found, key=lambda m: m.span)


def redact_matches(text: str, matches: Sequence[PiiMatch]) -> str:
    """``text`` with each of ``matches`` (non-overlapping, from ``find_pii(text)``) replaced by its token."""
    for kind, (start, end) in sorted(matches, key=lambda m: m.span, reverse=True):
        text = text[:start] + REDACTION_TOKENS[kind] + text[end:]
    return text


def redact_pii(text: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """``text`` with every PII item replaced by its token (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ...)."""
    return redact_matches(text, find_pii(text, region))


def messages_have_pii(messages: Sequence[Mapping[str, str]], region: str = DEFAULT_PHONE_REGION) -> bool:
    """Whether ANY turn of a chat (system, user or assistant) holds PII."""
    return any(find_pii(m.get("content", ""), region) for m in messages)


def redact_messages(messages: Sequence[Mapping[str, str]], region: str = DEFAULT_PHONE_REGION) -> list[dict[str, str]]:
    """A copy of the chat with every turn's PII replaced by tokens."""
    return [{**m, "content": redact_pii(m.get("content", ""), region)} for m in messages]


def safe_text(text: str, has_pii: bool, redacted_text: str | None, region: str = DEFAULT_PHONE_REGION) -> str:
    """What a flagged row may be shown as or trained on: its stored redacted text, else
    ``text`` redacted now; an unflagged row's ``text`` as it is."""
    if not has_pii:
        return text
    return redacted_text if redacted_text is not None else redact_pii(text, region)
