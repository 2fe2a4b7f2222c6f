"""How much labelers agree: pairwise agreement and Krippendorff's alpha on rankings.

Pure functions (no store, no torch), checked against values worked out by hand in
tests/test_agreement.py. A ranking is groups of completion ids, best first; ids in one
group are tied.

- `pair_agreement(a, b)`: over the pairs of completions both rankings order strictly
  (a tie in either says nothing about the direction), how many they order the same way.
  InstructGPT's "labelers agree with each other 72.6 ± 1.5% of the time" is this kind
  of figure (Ouyang et al. 2022, §3.4 and Appendix B).
- `gold_agreement(labeler, gold)`: over the gold ranking's strict pairs, how many the
  labeler ordered the same way; a tie by the labeler on a strict gold pair is a miss
  (the operator said one is better).
- `krippendorff_alpha(units, metric)`: chance-corrected agreement (Krippendorff 2011,
  "Computing Krippendorff's Alpha-Reliability"), for any number of coders and missing
  values. For rankings, a unit is one completion of a task several labelers ranked and a
  value is its rank (the 1-based index of its group), with the ordinal metric.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Ranking = Sequence[Sequence[str]]
Metric = Literal["nominal", "ordinal", "interval", "ratio"]


def rank_values(ranking: Ranking) -> dict[str, int]:
    """Each completion's rank: 1 for the best group, tied completions share theirs."""
    return {cid: rank for rank, group in enumerate(ranking, start=1) for cid in group}


def _strict_pairs(ranks: Mapping[str, int]) -> dict[tuple[str, str], int]:
    """For each unordered pair (sorted ids) the ranking orders strictly: +1 when the first
    id is better, -1 when the second is."""
    out = {}
    for x, y in itertools.combinations(sorted(ranks), 2):
        if ranks[x] != ranks[y]:
            out[(x, y)] = 1 if ranks[x] < ranks[y] else -1
    return out


@dataclass(frozen=True)
class Agreement:
    """`agreeing` of `pairs` judged pairs; `share` is None when no pair was judged."""

    agreeing: int = 0
    pairs: int = 0

    @property
    def share(self) -> float | None:
        return self.agreeing / self.pairs if self.pairs else None

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(self.agreeing + other.agreeing, self.pairs + other.pairs)


def pair_agreement(a: Ranking, b: Ranking) -> Agreement:
    """Agreement of two rankings of the same completions on the pairs both order strictly."""
    pa, pb = _strict_pairs(rank_values(a)), _strict_pairs(rank_values(b))
    both = pa.keys() & pb.keys()
    return Agreement(sum(pa[p] == pb[p] for p in both), len(both))


def gold_agreement(labeler: Ranking, gold: Ranking) -> Agreement:
    """How many of the gold ranking's strict pairs the labeler ordered the same way
    (a labeler's tie on one is a miss)."""
    mine, golden = _strict_pairs(rank_values(labeler)), _strict_pairs(rank_values(gold))
    return Agreement(sum(mine.get(p) == d for p, d in golden.items()), len(golden))


# ---------------------------------------------------------------- Krippendorff's alpha


def _delta2(metric: Metric, totals: Mapping[float, float]) -> Callable[[float, float], float]:
    """The squared difference function of a metric; `totals` is n_v per value (the
    ordinal metric depends on how the values are distributed)."""
    if metric == "nominal":
        return lambda c, k: 0.0 if c == k else 1.0
    if metric == "interval":
        return lambda c, k: float(c - k) ** 2
    if metric == "ratio":
        return lambda c, k: ((c - k) / (c + k)) ** 2 if c + k else 0.0
    if metric == "ordinal":
        values = sorted(totals)
        position = {v: i for i, v in enumerate(values)}

        def ordinal(c: float, k: float) -> float:
            lo, hi = sorted((position[c], position[k]))
            between = sum(totals[values[g]] for g in range(lo, hi + 1))
            return (between - (totals[c] + totals[k]) / 2) ** 2

        return ordinal
    raise ValueError(f"unknown metric {metric!r}: nominal | ordinal | interval | ratio")


def krippendorff_alpha(units: Iterable[Mapping[Hashable, float]], metric: Metric = "ordinal") -> float | None:
    """Alpha over `units`, each a mapping coder -> value (a coder missing from a unit gave
    no value). Units with fewer than two values are not pairable and are left out. None
    when fewer than two values are pairable or every pairable value is the same (no
    variation: alpha is undefined)."""
    coincidence: Counter = Counter()  # (c, k) -> o_ck
    for unit in units:
        values = list(unit.values())
        m = len(values)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            coincidence[(values[i], values[j])] += 1 / (m - 1)
    totals: defaultdict[float, float] = defaultdict(float)
    for (c, _), o in coincidence.items():
        totals[c] += o
    n = sum(totals.values())
    if n < 2 or len(totals) < 2:
        return None
    delta2 = _delta2(metric, totals)
    observed = sum(o * delta2(c, k) for (c, k), o in coincidence.items()) / n
    expected = sum(totals[c] * totals[k] * delta2(c, k) for c in totals for k in totals) / (n * (n - 1))
    return 1 - observed / expected if expected else None


# ---------------------------------------------------------------- labelers


@dataclass(frozen=True)
class LabeledRanking:
    """One labeler's ranking of one task: `task_key` names the completion set (rankings
    with the same key ranked the same completions)."""

    labeler: str
    group: str
    task_key: Hashable
    ranking: Ranking


@dataclass
class LabelerFigures:
    shared_tasks: int = 0
    with_others: Agreement = field(default_factory=Agreement)
    gold_tasks: int = 0
    with_gold: Agreement = field(default_factory=Agreement)


@dataclass(frozen=True)
class GroupFigures:
    labelers: int
    shared_tasks: int
    agreement: Agreement
    alpha: float | None


def labeler_figures(rankings: Sequence[LabeledRanking], gold: Mapping[Hashable, Ranking]) -> dict[str, LabelerFigures]:
    """Per labeler: agreement with every other labeler on the tasks they both ranked, and
    with the gold ranking of gold tasks (`gold`: task_key -> ranking). A labeler's own
    repeated ranking of a task is compared with nobody."""
    figures: defaultdict[str, LabelerFigures] = defaultdict(LabelerFigures)
    by_task: defaultdict[Hashable, list[LabeledRanking]] = defaultdict(list)
    for r in rankings:
        by_task[r.task_key].append(r)
        figures[r.labeler]  # every labeler gets a row, shared tasks or not
        if r.task_key in gold:
            figures[r.labeler].gold_tasks += 1
            figures[r.labeler].with_gold += gold_agreement(r.ranking, gold[r.task_key])
    for task in by_task.values():
        for r in task:
            others = [o for o in task if o.labeler != r.labeler]
            if others:
                figures[r.labeler].shared_tasks += 1
            for o in others:
                figures[r.labeler].with_others += pair_agreement(r.ranking, o.ranking)
    return dict(figures)


def group_figures(rankings: Sequence[LabeledRanking]) -> GroupFigures:
    """Agreement among the labelers of `rankings` (one group, or everyone): pairwise over
    each pair of labelers on each task they both ranked, and Krippendorff's alpha (ordinal)
    with one unit per completion of a task two or more of them ranked."""
    by_task: defaultdict[Hashable, dict[str, Ranking]] = defaultdict(dict)
    for r in rankings:
        by_task[r.task_key].setdefault(r.labeler, r.ranking)  # a repeat of one labeler counts once
    shared = {key: by_labeler for key, by_labeler in by_task.items() if len(by_labeler) >= 2}
    agreement = Agreement()
    units: list[dict[str, float]] = []
    for by_labeler in shared.values():
        for a, b in itertools.combinations(sorted(by_labeler), 2):
            agreement += pair_agreement(by_labeler[a], by_labeler[b])
        ranks = {labeler: rank_values(r) for labeler, r in by_labeler.items()}
        completions = sorted(set().union(*(r.keys() for r in ranks.values())))
        units += [{labeler: r[cid] for labeler, r in ranks.items() if cid in r} for cid in completions]
    return GroupFigures(len({r.labeler for r in rankings}), len(shared), agreement, krippendorff_alpha(units, "ordinal"))
