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


def test_prompt_agreement_counts_only_the_prompts_the_rule_decides():
    from bench.gate_power import prompt_agreement

    # prompt 1: rule prefers new, scorer too (1); prompt 2: rule prefers old, scorer new (0);
    # prompt 3: the rule ties (not counted); prompt 4: rule prefers new, the scorer ties (0.5)
    agree, counted = prompt_agreement([2.0, 1.0, 0.0, 1.0], [1.0, 0.0, 5.0, 1.0],
                                      [1.0, 0.0, 0.3, 0.9], [0.5, 0.2, 0.3, 0.1])
    assert (agree, counted) == (1.5, 3)


def test_right_calls_score_a_gate_against_the_rules_call_and_skip_the_rules_ties():
    from bench.gate_power import right_calls

    def pair(rule_win, says_better):
        return {"rule": {"win_rate": rule_win}, "judge": {"gate_says_better": {8: says_better}}}

    results = {"pairs": {"a": pair(0.6, 0.75), "b": pair(0.4, 0.25), "c": pair(0.5, 1.0)}}
    # a: the rule says better, the gate says so 0.75 of the time; b: the rule says worse,
    # the gate says "not better" 0.75 of the time; c: the rule ties, left out
    assert right_calls(results, "judge", 8) == 0.75
    assert right_calls({"pairs": {"c": pair(0.5, 1.0)}}, "judge", 8) is None
