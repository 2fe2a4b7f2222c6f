"""bench.gate_power's counting: a gate of n prompts says "better" only above half, ties half
(the win rate itself is trainer.evaluate.win_rate, tested in tests/test_evaluate.py)."""

import random

from bench.gate_power import gate_says_better


def test_gate_says_better_all_wins_all_losses_all_ties():
    rng = random.Random(0)
    assert gate_says_better([1.0] * 10, [0.0] * 10, 4, rng) == 1.0
    assert gate_says_better([0.0] * 10, [1.0] * 10, 4, rng) == 0.0
    assert gate_says_better([1.0] * 10, [1.0] * 10, 4, rng) == 0.0  # a tie (0.5) is not "above half"


def test_gate_says_better_matches_the_hypergeometric_share():
    # 3 wins and 1 loss among 4 prompts, subsets of 2: "better" needs both wins: C(3,2)/C(4,2) = 0.5
    share = gate_says_better([1, 1, 1, 0], [0, 0, 0, 1], 2, random.Random(1))
    assert abs(share - 0.5) < 0.05
