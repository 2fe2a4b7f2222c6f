"""The demo's verdict holds its level: simulated with the demo's noisy labelers and neither
policy better, the prompt-level test calls p < 0.01 at most about 1% of the time; pooling
the two labelers' verdicts on the same pairs, as the demo did until 2026-12-05, did not."""

from __future__ import annotations

from bench.verdict_power import simulate


def test_the_prompt_level_test_keeps_its_false_positive_rate_and_pooling_does_not():
    rates = simulate(prompts=64, rule_win=0.5, trials=2000, seed=3)
    # 2,000 verdicts: a rate of 0.01 would be 20 +- 4.5 of them.
    assert rates["prompt"] <= 0.012
    assert rates["pooled"] >= 0.015


def test_a_policy_the_rule_prefers_often_passes():
    rates = simulate(prompts=64, rule_win=0.8, trials=200, seed=3)
    assert rates["prompt"] > 0.8
