"""Agreement metrics against values worked out by hand (and Krippendorff's published example)."""

from __future__ import annotations

import pytest

from common.agreement import (
    Agreement,
    LabeledRanking,
    gold_agreement,
    group_figures,
    krippendorff_alpha,
    labeler_figures,
    pair_agreement,
    rank_values,
)

BEST_X = [["x"], ["y"], ["z"], ["w"]]  # x > y > z > w
BEST_Y = [["y"], ["x"], ["z", "w"]]  # y > x > z = w


def test_rank_values_give_tied_completions_one_rank() -> None:
    assert rank_values(BEST_Y) == {"y": 1, "x": 2, "z": 3, "w": 3}


def test_pair_agreement_counts_only_pairs_both_order_strictly() -> None:
    # 6 pairs; BEST_Y ties z and w, leaving 5 both order. They differ on (x, y) only.
    assert pair_agreement(BEST_X, BEST_Y) == Agreement(4, 5)
    assert pair_agreement(BEST_Y, BEST_X) == Agreement(4, 5)
    assert pair_agreement(BEST_X, BEST_X).share == 1.0
    assert pair_agreement(BEST_X, list(reversed(BEST_X))).share == 0.0


def test_gold_agreement_counts_a_tie_on_a_strict_gold_pair_as_a_miss() -> None:
    # Gold BEST_X orders all 6 pairs; the labeler gets (x, y) wrong and ties (z, w): 4 of 6.
    assert gold_agreement(BEST_Y, BEST_X) == Agreement(4, 6)
    assert gold_agreement(BEST_X, BEST_Y) == Agreement(4, 5)  # gold's own tie is not a pair


def test_agreement_with_no_pairs_has_no_share() -> None:
    assert pair_agreement([["a", "b"]], [["a"], ["b"]]).share is None
    assert (Agreement(1, 2) + Agreement(3, 4)) == Agreement(4, 6)


@pytest.mark.parametrize(("metric", "published"), [("nominal", 0.743), ("ordinal", 0.815),
                                                    ("interval", 0.849), ("ratio", 0.797)])  # fmt: skip
def test_alpha_matches_krippendorffs_worked_example(metric: str, published: float) -> None:
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", §C: 4 observers,
    12 units, missing values; the paper gives alpha for each metric to 3 decimals."""
    n = None
    rows = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
            "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
            "C": [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
            "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]}  # fmt: skip
    units = [{coder: v for coder, v in zip(rows, column, strict=True) if v is not None} for column in zip(*rows.values(), strict=True)]
    assert krippendorff_alpha(units, metric) == pytest.approx(published, abs=5e-4)  # type: ignore[arg-type]


def test_alpha_by_hand_two_coders_three_units() -> None:
    """Units {1,1}, {2,2}, {1,2}: o11 = o22 = 2, o12 = o21 = 1, n1 = n2 = 3, n = 6.
    Nominal: Do = 2/6, De = 2*3*3/(6*5) = 0.6, alpha = 1 - (1/3)/0.6 = 4/9. With two
    values every metric is a rescaling of nominal, so all give 4/9."""
    units = [{"A": 1, "B": 1}, {"A": 2, "B": 2}, {"A": 1, "B": 2}]
    for metric in ("nominal", "ordinal", "interval"):
        assert krippendorff_alpha(units, metric) == pytest.approx(4 / 9)  # type: ignore[arg-type]


def test_alpha_is_one_for_perfect_agreement_and_undefined_without_variation() -> None:
    assert krippendorff_alpha([{"A": 1, "B": 1}, {"A": 3, "B": 3}]) == pytest.approx(1.0)
    assert krippendorff_alpha([{"A": 2, "B": 2}, {"A": 2, "B": 2}]) is None
    assert krippendorff_alpha([{"A": 1}, {"B": 2}]) is None  # nothing pairable
    with pytest.raises(ValueError, match="unknown metric"):
        krippendorff_alpha([{"A": 1, "B": 2}, {"A": 2, "B": 2}], "cosine")  # type: ignore[arg-type]


def test_group_figures_by_hand() -> None:
    """Two labelers rank a, b, c, d and swap c and d: 5 of 6 pairs agree. Alpha (ordinal):
    units a {1,1}, b {2,2}, c {3,4}, d {4,3}; every value has n_v = 2, n = 8.
    delta^2 = (sum of n_g from c to k - (n_c + n_k)/2)^2: 4 for neighbours, 16 two apart,
    36 three apart. Do = (o34 + o43) * 4 / 8 = 2; De = 4 * (6*4 + 4*16 + 2*36) / (8*7)
    = 640/56; alpha = 1 - 2 * 56 / 640 = 0.825. A third labeler alone on another task
    adds no shared task."""
    rankings = [
        LabeledRanking("L1", "A", "T", [["a"], ["b"], ["c"], ["d"]]),
        LabeledRanking("L2", "A", "T", [["a"], ["b"], ["d"], ["c"]]),
        LabeledRanking("L3", "A", "U", [["e"], ["f"], ["g"], ["h"]]),
    ]
    figures = group_figures(rankings)
    assert (figures.labelers, figures.shared_tasks, figures.agreement) == (3, 1, Agreement(5, 6))
    assert figures.alpha == pytest.approx(0.825)


def test_labeler_figures_by_hand() -> None:
    """L1 and L2 share task T (5 of 6 pairs agree); T is gold with L1's order, so L1 scores
    6/6 and L2 5/6 on gold; L3 shares nothing and has no gold task."""
    rankings = [
        LabeledRanking("L1", "A", "T", [["a"], ["b"], ["c"], ["d"]]),
        LabeledRanking("L2", "B", "T", [["a"], ["b"], ["d"], ["c"]]),
        LabeledRanking("L3", "A", "U", [["e"], ["f"], ["g"], ["h"]]),
    ]
    figures = labeler_figures(rankings, gold={"T": [["a"], ["b"], ["c"], ["d"]]})
    assert (figures["L1"].shared_tasks, figures["L1"].with_others, figures["L1"].with_gold) == (1, Agreement(5, 6), Agreement(6, 6))
    assert (figures["L2"].gold_tasks, figures["L2"].with_gold) == (1, Agreement(5, 6))
    assert (figures["L3"].shared_tasks, figures["L3"].with_others.share, figures["L3"].gold_tasks) == (0, None, 0)
