"""Text normalisation shared by the store and data hygiene.

The store keys every prompt by ``normalize_text`` (its ``dedup_key`` column), and hygiene
compares prefixes of the same normal form, so ``hygiene.dedup_key(text, n)`` equals the
stored key cut to n characters.
"""

from __future__ import annotations

import unicodedata


def normalize_text(text: str) -> str:
    """NFKC, lower-cased, every whitespace run turned into one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())
