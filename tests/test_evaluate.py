"""Evaluation helpers: significance, win rate, per-group RM accuracy, KL, alignment tax, sampling."""

from __future__ import annotations

import pytest
import torch

from common.models import load_causal_lm, load_tokenizer
from trainer.config import EvalConfig
from trainer.evaluate import (
    accuracy_by_group,
    binomial_sf_one_sided,
    pairwise_accuracy,
    ptx_eval_loss,
    sample_responses,
    sampled_kl,
    sign_flip_p_value,
    win_rate,
)
from trainer.examples import Comparison, user_turn


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir, dtype="float32", device="cpu"), load_tokenizer(tiny_model_dir)


# ---------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("k, n, p, expected", [
    (8, 10, 0.5, 56 / 1024),  # C(10,8) + C(10,9) + C(10,10) = 45 + 10 + 1 = 56, over 2^10
    (10, 10, 0.5, 1 / 1024),
    (5, 10, 0.5, 638 / 1024),  # 252 + 210 + 120 + 45 + 10 + 1
    (2, 3, 0.3, 0.216),  # 3 * 0.3^2 * 0.7 + 0.3^3 = 0.189 + 0.027
    (0, 5, 0.5, 1.0),
    (6, 5, 0.5, 0.0),
])
def test_binomial_sf_hand_values(k, n, p, expected):
    assert binomial_sf_one_sided(k, n, p) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("nets, expected", [
    ([1, 1], 1 / 4),  # sums of +-1 +-1: 2, 0, 0, -2; only 2 reaches 2
    ([2, 1], 1 / 4),  # 3, 1, -1, -3: only 3 reaches 3
    ([2, 1, -1], 3 / 8),  # observed 2; +-2 +-1 +-1: 4, 2, 2, 0, 0, -2, -2, -4: three reach 2
    ([2, 0, 0], 1 / 2),  # prompts both judges tie carry nothing: +-2
    ([-1, -2], 1.0),  # the lowest sum: every sign pattern reaches it
    ([0, 0], 1.0),
])
def test_sign_flip_p_value_hand_values(nets, expected):
    assert sign_flip_p_value(nets) == pytest.approx(expected, rel=1e-12)


def test_sign_flip_with_one_judge_per_prompt_is_the_binomial_sign_test():
    nets = [1] * 14 + [-1] * 6 + [0] * 5
    assert sign_flip_p_value(nets) == pytest.approx(binomial_sf_one_sided(14, 20), rel=1e-12)


def test_two_judges_who_always_agree_count_as_one():
    # The same verdicts given twice per prompt say no more than once: the pooled binomial
    # test (28 wins of 40) would call this p = 0.008, the prompt-level test 0.058.
    doubled, single = [2] * 14 + [-2] * 6, [1] * 14 + [-1] * 6
    assert sign_flip_p_value(doubled) == pytest.approx(sign_flip_p_value(single), rel=1e-12)
    assert binomial_sf_one_sided(28, 40) < 0.01 < sign_flip_p_value(doubled)


def test_binomial_sf_rejects_bad_arguments():
    with pytest.raises(ValueError):
        binomial_sf_one_sided(1, 5, 1.5)


def test_win_rate_counts_ties_half():
    a = torch.tensor([1.0, 2.0, 3.0, 5.0])
    b = torch.tensor([0.0, 2.0, 4.0, 5.0])
    # win, tie, loss, tie -> (1 + 0.5 + 0 + 0.5) / 4
    assert win_rate(a, b) == pytest.approx(0.5)
    assert win_rate(b, a) == pytest.approx(0.5)
    assert win_rate(torch.tensor([2.0]), torch.tensor([1.0])) == 1.0
    with pytest.raises(ValueError):
        win_rate(torch.zeros(2), torch.zeros(3))


def test_accuracy_by_group_hand_case():
    comparisons = [
        # K = 3, strict ranking 0 > 1 > 2: 3 pairs
        Comparison(user_turn("a"), ("x", "y", "z"), (0, 1, 2), labeler_group="train"),
        # K = 3 with a tie: ranks (0, 0, 1) give 2 pairs, (0, 2) and (1, 2)
        Comparison(user_turn("b"), ("x", "y", "z"), (0, 0, 1), labeler_group="heldout"),
        # K = 2
        Comparison(user_turn("c"), ("x", "y"), (1, 0), labeler_group="train"),
    ]
    scores = [
        torch.tensor([3.0, 1.0, 2.0]),  # (0,1) right, (0,2) right, (1,2) wrong -> 2/3
        torch.tensor([0.0, 5.0, 1.0]),  # (0,2) wrong, (1,2) right -> 1/2
        torch.tensor([1.0, 1.0]),  # a score tie is wrong -> 0/1
    ]
    result = accuracy_by_group(scores, comparisons)
    assert result["num_pairs"] == 6 and result["num_comparisons"] == 3
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["by_group"]["train"] == {"accuracy": pytest.approx(2 / 4), "num_pairs": 4, "num_comparisons": 2}
    assert result["by_group"]["heldout"] == {"accuracy": pytest.approx(1 / 2), "num_pairs": 2,
                                             "num_comparisons": 1}


class LengthScorer:
    """Scores a response by its length in characters (the longest wins)."""

    def __init__(self) -> None:
        self.scored = 0

    def score_texts(self, tokenizer, prompts, responses, batch_size=16, stopped=None):
        self.scored += len(responses)
        return torch.tensor([float(len(r)) for r in responses])


def test_pairwise_accuracy_scores_each_completion_once():
    comparisons = [
        Comparison(user_turn("a"), ("long answer", "short", "mid one"), (0, 2, 1), labeler_group="g1"),
        Comparison(user_turn("b"), ("tiny", "a longer one"), (0, 1), labeler_group="g2"),
    ]
    scorer = LengthScorer()
    result = pairwise_accuracy(scorer, None, comparisons)
    assert scorer.scored == 5
    assert result["by_group"]["g1"]["accuracy"] == 1.0  # lengths 11 > 7 > 5 match ranks 0 < 1 < 2
    assert result["by_group"]["g2"]["accuracy"] == 0.0
    assert result["accuracy"] == pytest.approx(3 / 4)


def test_eval_config_rejects_bad_values():
    for field, value in [("max_new_tokens", 0), ("temperature", -1.0),
                         ("max_prompts", 0), ("ptx_max_length", 1)]:
        with pytest.raises(ValueError, match=field):
            EvalConfig(**{field: value})


# ---------------------------------------------------------------------------- model helpers


def test_greedy_sampling_is_batch_invariant(tiny):
    """Left padding: a prompt's greedy answer does not depend on its batch neighbours."""
    model, tok = tiny
    prompts = [user_turn("Hi"), user_turn("What is the capital of a very large country?")]
    batched = sample_responses(model, tok, prompts, max_new_tokens=6, temperature=0.0, batch_size=2)
    alone = [sample_responses(model, tok, [p], max_new_tokens=6, temperature=0.0)[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(t, str) and t for t in batched)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tok = tiny
    prompts = [user_turn("Say something")] * 3
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample_responses(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_responses(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=7) == first
    assert sample_responses(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=8) != first


def test_sampled_kl_is_zero_for_the_same_model_and_refuses_greedy_answers(tiny):
    model, tok = tiny
    prompts = [user_turn("a"), user_turn("bb")]
    for estimator in ("k1", "k2", "k3"):
        kl = sampled_kl(model, model, tok, prompts, temperature=1.0, max_new_tokens=6, estimator=estimator,
                        samples_per_prompt=2)
        assert kl["per_token"] == pytest.approx(0.0, abs=1e-6) and kl["samples"] == 4 and kl["tokens"] > 0
    with pytest.raises(ValueError, match="greedy"):
        sampled_kl(model, model, tok, prompts, temperature=0.0, max_new_tokens=6)


def test_sampled_kl_of_another_model_is_positive_with_k3_and_matches_the_sum(tiny, tiny_model_dir):
    """k3 is >= 0 per token; per_sequence = per_token * tokens / samples (same tokens)."""
    model, tok = tiny
    other = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    kl = sampled_kl(model, other, tok, [user_turn("a"), user_turn("bb")], temperature=1.0, max_new_tokens=8,
                    estimator="k3", samples_per_prompt=3, seed=3)
    assert kl["per_token"] > 0
    assert kl["per_sequence"] == pytest.approx(kl["per_token"] * kl["tokens"] / kl["samples"], rel=1e-5)


def test_accuracy_by_group_version_separates_the_policies_that_sampled():
    comparisons = [
        Comparison(user_turn("a"), ("x", "y"), (0, 1), labeler_group="B", policy_versions=(3, 3)),
        Comparison(user_turn("b"), ("x", "y"), (0, 1), labeler_group="B", policy_versions=(0, 0)),
        Comparison(user_turn("c"), ("x", "y"), (0, 1), labeler_group="B", policy_versions=(0, 3)),
        Comparison(user_turn("d"), ("x", "y"), (0, 1), labeler_group="B", policy_versions=(None, None)),
        Comparison(user_turn("d"), ("x", "y"), (0, 1), labeler_group="A"),
    ]
    scores = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
              torch.tensor([1.0, 0.0])]
    result = accuracy_by_group(scores, comparisons)
    by_version = result["by_group_version"]
    assert by_version["B"]["3"]["accuracy"] == 1.0 and by_version["B"]["0"]["accuracy"] == 0.0
    # (0, 3): two versions; (None, None): each completion spans a hot swap. Both are "mixed".
    assert by_version["B"]["mixed"]["num_pairs"] == 2 and by_version["B"]["mixed"]["accuracy"] == 0.5
    assert by_version["A"]["unknown"]["accuracy"] == 1.0
    assert result["by_group"]["B"]["accuracy"] == pytest.approx(2 / 4)


def test_ptx_eval_loss_is_the_token_mean_nll(tiny):
    model, tok = tiny
    texts = ["The river runs to the sea.", "Bread rises in a warm kitchen, slowly."]
    loss = ptx_eval_loss(model, tok, texts, max_length=64, batch_size=1)
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert loss == pytest.approx(nll / count, rel=1e-5)
    # batching (right padding) changes nothing
    assert ptx_eval_loss(model, tok, texts, max_length=64, batch_size=2) == pytest.approx(loss, rel=1e-5)
