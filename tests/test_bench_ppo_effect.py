"""bench.ppo_effect's win rate over several sampled answers per prompt, on hand-worked values."""

from __future__ import annotations

import pytest

from bench.ppo_effect import rule_win_and_error, rule_win_over_samples


def longer_wins(prompt: str, answer: str) -> float:
    return float(len(answer))


def test_each_prompt_counts_once_whatever_its_number_of_samples():
    prompts = ["p1", "p2"]
    # new[j][i]: the j-th sample for prompt i. p1: "aa" > "a" (1), "a" = "a" (0.5): 0.75;
    # p2: "b" = "b" (0.5), "c" < "cc" (0): 0.25. Mean 0.5; spread 0.25 over 2 prompts.
    new = [["aa", "b"], ["a", "c"]]
    old = [["a", "b"], ["a", "cc"]]
    win, error = rule_win_over_samples(longer_wins, prompts, new, old)
    assert win == pytest.approx(0.5)
    assert error == pytest.approx(0.25 / 2 ** 0.5)


def test_one_sample_per_prompt_is_the_greedy_comparison():
    prompts = ["p1", "p2", "p3"]
    new, old = ["aa", "b", "c"], ["a", "bb", "c"]
    assert rule_win_over_samples(longer_wins, prompts, [new], [old]) == pytest.approx(
        rule_win_and_error(longer_wins, prompts, new, old))
