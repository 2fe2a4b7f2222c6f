"""bench.reward_curve's rankings: the training labelers' noise is a parameter (``--noise``),
the test views are not."""

from __future__ import annotations

import random

from bench.policy_samples import PromptSamples, SampleSet
from bench.reward_curve import TEST_PROMPTS, comparisons_for
from clients.simulated_labeler import concise_polite, groups_by_score


def sample_set(prompts: int = TEST_PROMPTS + 40, k: int = 9) -> SampleSet:
    rng = random.Random(0)
    words = "please thanks the a reply answer helpful glad 42 yes no maybe".split()
    rows = [PromptSamples(f"Explain topic number {i} clearly", [[1]] * k,
                          [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(k)], [True] * k)
            for i in range(prompts)]
    return SampleSet("fp", k, 64, 1.0, 0, 1.0, prompts * k, rows)


def rule_ranks(samples: SampleSet, comparison) -> tuple[int, ...]:
    row = samples.rows[int(comparison.prompt_id)]
    groups = groups_by_score([concise_polite(row.prompt, t) for t in row.texts])
    return tuple(next(r for r, g in enumerate(groups) if j in g) for j in range(len(row.texts)))


def test_noise_zero_trains_on_the_rules_own_rankings_and_leaves_the_test_views_alone():
    samples = sample_set()
    clean, noisy = comparisons_for(samples, noise=0.0), comparisons_for(samples)
    assert all(c.ranks == rule_ranks(samples, c) for c in clean.train)
    flipped = sum(c.ranks != rule_ranks(samples, c) for c in noisy.train)
    assert 0 < flipped < len(noisy.train)  # p = 0.16: about a third of the rankings at random
    assert [c.ranks for c in clean.test_rule] == [c.ranks for c in noisy.test_rule]
    assert [c.ranks for c in clean.test_held_out] == [c.ranks for c in noisy.test_held_out]
