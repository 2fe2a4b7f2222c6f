"""What a valid ranking is, and the pairs it implies: pure checks shared by the store (which
refuses an invalid ranking whoever writes it), the Feedback service (which checks before
it looks anything up, so the first problem is the one named) and the JSONL exchange.

A ranking is a list of groups of completion ids, best first; ids in one group are tied.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from common.store.errors import InvalidArgumentError

Groups = list[list[str]]

LABEL_MIN_K, LABEL_MAX_K = 4, 9  # the labeling queue (the paper's K = 4..9)
IMPORT_MIN_K = 2  # imported comparisons may be pairs
MAX_ID_CHARS = 128


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
    """A ranking of fewer than two groups (all tied, or one completion) implies no pair: it
    says nothing, and is refused."""
    if len(groups) == 1 and len(groups[0]) > 1:
        raise InvalidArgumentError(f"all {len(groups[0])} completions are tied: a ranking must prefer at least one")
    if len(groups) < 2:
        raise InvalidArgumentError("a ranking needs at least two groups: one completion preferred over another")


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
