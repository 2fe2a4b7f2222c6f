"""trainer.losses against numbers worked out by hand (the arithmetic is in the comments).

Constants used below:
  log(1+e^-1) = 0.3132617   log(1+e^-2) = 0.1269280   log(1+e^-3) = 0.0485874
  log(1+e^1)  = 1.3132617   log 2 = 0.6931472          log 3 = 1.0986123
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from trainer.losses import (
    AdaptiveKLController,
    FixedKLController,
    batched_ranking_loss,
    compute_approx_kl,
    kl_summary,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    whiten_from_sums,
    ppo_policy_loss,
    ptx_loss,
    ranking_loss,
    ranking_pair_accuracy,
    response_logprobs,
    rloo_advantages,
    sft_loss,
    value_loss,
)

LOG1P_EXP_M1 = 0.3132617  # -log σ(1)
LOG1P_EXP_M2 = 0.1269280  # -log σ(2)
LOG1P_EXP_M3 = 0.0485874  # -log σ(3)
LOG1P_EXP_1 = 1.3132617  # -log σ(-1)
LOG2 = 0.6931472


def t(x, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------- masked stats


def test_masked_mean_pools_valid_tokens_of_whole_batch():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3, not mean of row means (1.5 + 4) / 2
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_mean(x + 100 * (1 - mask), mask), 7 / 3)  # padding values change nothing
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN


def test_masked_var_biased_and_unbiased():
    x = t([[1.0, 2.0, 4.0, 99.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    close(masked_var(x, mask, unbiased=False), 14 / 9)  # / 3
    close(masked_var(x, mask), 7 / 3)  # / (3 - 1)
    close(masked_var(t([[5.0, 0.0]]), t([[1, 0]])), 0.0)  # one token: no Bessel blow-up


def test_whiten_from_sums_whitens_over_every_ranks_tokens():
    """x = 1, 2 on one rank and 3, 4 (plus padding) on another: n = 4, sum 10, sum of squares
    30; mean 2.5, unbiased variance (30 - 4 * 2.5^2) / 3 = 5/3; so 1 -> -1.5 / sqrt(5/3) =
    -1.161895 and 2 -> -0.387298, as masked_whiten of all four tokens at once."""
    x, mask = torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)
    close(whiten_from_sums(x, mask, 4.0, 10.0, 30.0), [[-1.161895, -0.387298]], atol=1e-5)
    both = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 9.0]])
    both_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    close(whiten_from_sums(both, both_mask, 4.0, 10.0, 30.0), masked_whiten(both, both_mask), atol=1e-5)


def test_masked_whiten_zero_mean_unit_var_padding_zero():
    x = t([[1.0, 3.0, 100.0]])
    mask = t([[1, 1, 0]])
    # mean 2, unbiased var ((-1)^2 + 1^2) / 1 = 2 -> (x - 2) / sqrt(2) = ∓0.7071068
    close(masked_whiten(x, mask), [[-0.7071068, 0.7071068, 0.0]], atol=1e-5)
    # shift_mean=False adds the mean back: 2 ∓ 0.7071068
    close(masked_whiten(x, mask, shift_mean=False), [[1.2928932, 2.7071068, 0.0]], atol=1e-5)


# ---------------------------------------------------------------------------- ranking loss


def test_ranking_loss_two_completions():
    # one pair, winner 2 vs loser 1: -log σ(2 - 1) = log(1 + e^-1)
    close(ranking_loss(t([2.0, 1.0]), t([0, 1], torch.long)), LOG1P_EXP_M1)


def test_ranking_loss_k4_strict_order():
    rewards, ranks = t([3.0, 2.0, 1.0, 0.0]), t([0, 1, 2, 3], torch.long)
    # C(4,2) = 6 pairs: gap 1 x3, gap 2 x2, gap 3 x1
    # (3*0.3132617 + 2*0.1269280 + 0.0485874) / 6 = 1.2422285 / 6 = 0.2070381
    close(ranking_loss(rewards, ranks), (3 * LOG1P_EXP_M1 + 2 * LOG1P_EXP_M2 + LOG1P_EXP_M3) / 6)
    close(ranking_loss(rewards, ranks), 0.2070381)


def test_ranking_loss_k9_has_36_pairs():
    ranks = torch.arange(9)
    # all rewards equal: each of the 36 pairs gives -log σ(0) = log 2
    close(ranking_loss(torch.zeros(9), ranks), LOG2)
    # top 4 score 1, bottom 5 score 0: within-group pairs C(4,2) + C(5,2) = 6 + 10 = 16 at
    # margin 0 (log 2), cross pairs 4*5 = 20 at margin 1 (log(1+e^-1)); 16 + 20 = 36.
    # (16*0.6931472 + 20*0.3132617) / 36 = (11.0903549 + 6.2652340) / 36 = 0.4820997
    rewards = t([1.0] * 4 + [0.0] * 5)
    close(ranking_loss(rewards, ranks), 0.4820997)


def test_ranking_loss_excludes_tied_pairs():
    rewards, ranks = t([3.0, 2.0, 1.0, 0.0]), t([0, 1, 1, 2], torch.long)
    # completions 1 and 2 tied -> 5 ordered pairs: (0,1) gap 1, (0,2) gap 2, (0,3) gap 3,
    # (1,3) gap 2, (2,3) gap 1 -> (2*0.3132617 + 2*0.1269280 + 0.0485874) / 5 = 0.1857934
    close(ranking_loss(rewards, ranks), 0.1857934)
    # swapping the tied pair's rewards changes no ordered pair's multiset of gaps
    close(ranking_loss(t([3.0, 1.0, 2.0, 0.0]), ranks), 0.1857934)


@pytest.mark.parametrize("ranks", [[0, 0, 0, 0], [2, 2], [0]])
def test_ranking_loss_without_ordered_pair_raises(ranks):
    with pytest.raises(ValueError, match="no ordered pair"):
        ranking_loss(torch.zeros(len(ranks)), t(ranks, torch.long))


def test_ranking_loss_gradient_pushes_winner_up_loser_down():
    rewards = torch.zeros(2, requires_grad=True)
    ranking_loss(rewards, t([0, 1], torch.long)).backward()
    # d/dr_w [-log σ(r_w - r_l)] = -σ(r_l - r_w) = -σ(0) = -0.5, and +0.5 for the loser
    close(rewards.grad, [-0.5, 0.5])


def test_ranking_loss_k9_gradient_by_rank():
    rewards = torch.zeros(9, requires_grad=True)
    ranking_loss(rewards, torch.arange(9)).backward()
    # each pair at margin 0 adds ∓σ(0)/36 = ∓0.5/36: completion of rank k beats 8-k, loses to k
    # -> grad_k = 0.5 * (k - (8 - k)) / 36 = (2k - 8) / 72; rank 0: -1/9, rank 4: 0, rank 8: +1/9
    close(rewards.grad, [(2 * k - 8) / 72 for k in range(9)])


def test_batched_ranking_loss_with_padding_is_mean_of_prompt_losses():
    nan = float("nan")
    # prompt 0: K=4, strict order, rewards agree: 0.2070381 (6 pairs)
    # prompt 1: K=2 (2 padded slots), rewards disagree: -log σ(1 - 2) = log(1+e) = 1.3132617
    rewards = t([[3.0, 2.0, 1.0, 0.0], [1.0, 2.0, nan, 1e9]], torch.float64).requires_grad_()
    ranks = t([[0, 1, 2, 3], [0, 1, -1, -5]], torch.long)  # padded ranks would beat everyone
    valid = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, stats = batched_ranking_loss(rewards, ranks, valid)
    # per-prompt means, then the mean over prompts: (0.2070381 + 1.3132617) / 2 = 0.7601499
    close(loss, 0.7601499)
    expected = (ranking_loss(rewards[0], ranks[0]) + ranking_loss(rewards[1, :2], ranks[1, :2])) / 2
    close(loss, expected.detach())
    assert stats.num_pairs.item() == 7  # 6 + 1
    close(stats.accuracy, 6 / 7)  # prompt 1's only pair is wrong
    # margins: prompt 0 gives 1+1+1+2+2+3 = 10, prompt 1 gives 1 - 2 = -1 -> 9 / 7
    close(stats.margin, 9 / 7)
    loss.backward()
    assert torch.isfinite(rewards.grad).all()  # NaN/huge padding does not poison the gradient
    close(rewards.grad[1, 2:], [0.0, 0.0])
    # prompt 1 weighs 1/2: d/dr_w = -σ(r_l - r_w)/2 = -σ(1)/2 = -0.7310586/2 = -0.3655293
    close(rewards.grad[1, :2], [-0.3655293, 0.3655293])


def test_batched_ranking_loss_raises_on_prompt_without_pairs():
    rewards = torch.zeros(2, 3)
    ranks = t([[0, 1, 2], [1, 1, 0]], torch.long)
    valid = t([[1, 1, 1], [1, 1, 0]])  # prompt 1: the two valid completions are tied
    with pytest.raises(ValueError, match=r"prompts \[1\]"):
        batched_ranking_loss(rewards, ranks, valid)


def test_ranking_pair_accuracy_counts_reward_ties_as_wrong():
    # pairs (0,1) right (2 > 1), (0,2) right (2 > 1), (1,2) tie in reward -> wrong: 2/3
    close(ranking_pair_accuracy(t([2.0, 1.0, 1.0]), t([0, 1, 2], torch.long)), 2 / 3)


def test_batched_ranking_loss_gradcheck():
    rewards = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ranks = t([[0, 1, 1], [2, 0, 1]], torch.long)
    valid = t([[1, 1, 1], [1, 1, 0]], torch.float64)
    assert torch.autograd.gradcheck(lambda r: batched_ranking_loss(r, ranks, valid)[0], (rewards,))


# ---------------------------------------------------------------------------- KL and rewards


def test_compute_approx_kl_estimators():
    logprobs, ref = t([[-1.0, -2.0, 0.0]]), t([[-1.5, -1.0, 0.0]])
    mask = t([[1, 1, 0]])
    # log_ratio = [0.5, -1.0, (pad)]
    close(compute_approx_kl(logprobs, ref, mask, "k1"), [[0.5, -1.0, 0.0]])
    # k2 = 0.5 * lr^2 = [0.125, 0.5]
    close(compute_approx_kl(logprobs, ref, mask, "k2"), [[0.125, 0.5, 0.0]])
    # k3 = e^-lr - 1 + lr: e^-0.5 - 0.5 = 0.6065307 - 0.5 = 0.1065307; e^1 - 2 = 0.7182818
    close(compute_approx_kl(logprobs, ref, mask, estimator="k3"), [[0.1065307, 0.7182818, 0.0]])
    close(compute_approx_kl(logprobs, ref), [[0.5, -1.0, 0.0]])  # no mask, default k1


def test_kl_summary_per_token_and_per_sequence_by_hand():
    # log-ratios: row 0 [0.5, -1.0] (2 tokens), row 1 [0.2] (1 token, then padding)
    logprobs = torch.tensor([[-1.0, -2.0], [-0.3, -9.0]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    k1 = kl_summary(logprobs, ref, mask, "k1")
    # per token: (0.5 - 1.0 + 0.2) / 3 = -0.1; per sequence: ((0.5 - 1.0) + 0.2) / 2 = -0.15
    close(k1.per_token, -0.1)
    close(k1.per_sequence, -0.15)
    assert float(k1.num_tokens) == 3.0
    k3 = kl_summary(logprobs, ref, mask, "k3")
    # k3(r) = e^-r - 1 + r: 0.1065307, 0.7182818, e^-0.2 - 0.8 = 0.0187308; mean 0.2811811
    close(k3.per_token, 0.2811811)
    close(k3.per_sequence, (0.1065307 + 0.7182818 + 0.0187308) / 2)


def test_compute_approx_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="Unknown KL estimator: k4"):
        compute_approx_kl(torch.zeros(1, 1), torch.zeros(1, 1), None, estimator="k4")


def test_kl_penalized_rewards_score_on_last_valid_token():
    scores = t([2.0, -1.0])
    log_ratio = t([[0.5, -1.0, 9.0], [0.1, 0.2, 0.3]])
    logprobs, ref = log_ratio - 3.0, torch.full((2, 3), -3.0)
    mask = t([[1, 1, 0], [1, 1, 1]])
    rewards = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # row 0: -0.1*[0.5, -1.0] = [-0.05, 0.1], score 2 on index 1 (last valid), pad 0
    # row 1: -0.1*[0.1, 0.2, 0.3] = [-0.01, -0.02, -0.03], score -1 on index 2
    close(rewards, [[-0.05, 2.1, 0.0], [-0.01, -0.02, -1.03]], atol=1e-5)


def test_kl_penalized_rewards_with_prompt_positions_masked_out():
    # label grid of trainer.data: prompt positions (0) precede the response, padding follows
    mask = t([[0, 1, 1, 0]])
    rewards = kl_penalized_rewards(t([5.0]), torch.zeros(1, 4), torch.zeros(1, 4), mask, kl_coef=0.02)
    close(rewards, [[0.0, 0.0, 5.0, 0.0]])


# ---------------------------------------------------------------------------- GAE


def test_gae_one_token_response():
    # delta_0 = r_0 + gamma * 0 - V_0 = 1 - 0.5 = 0.5; A_0 = 0.5; R_0 = 0.5 + 0.5 = 1.0
    adv, ret = gae(t([[0.5]]), t([[1.0]]), t([[1.0]]), gamma=0.9, lam=0.95)
    close(adv, [[0.5]])
    close(ret, [[1.0]])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    values = t([[0.5, 1.0, 1.5, 7.0]])
    rewards = t([[1.0, 0.0, 2.0, 3.0]])
    mask = t([[1, 1, 1, 0]])
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=1.0)
    # reward-to-go [1+0+2, 0+2, 2] = [3, 2, 2]; minus values [0.5, 1, 1.5]
    close(adv, [[2.5, 1.0, 0.5, 0.0]])
    close(ret, [[3.0, 2.0, 2.0, 0.0]])


def test_gae_discounted_and_padding_invariant():
    values = t([[1.0, 2.0, 0.0]])
    rewards = t([[0.0, 1.0, 0.0]])
    mask = t([[1, 1, 0]])
    # delta_1 = 1 + 0.5*0 - 2 = -1, A_1 = -1
    # delta_0 = 0 + 0.5*2 - 1 = 0,  A_0 = 0 + 0.5*0.5*(-1) = -0.25
    # returns = A + V = [0.75, 1.0]
    adv, ret = gae(values, rewards, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.25, -1.0, 0.0]])
    close(ret, [[0.75, 1.0, 0.0]])
    adv2, ret2 = gae(t([[1.0, 2.0, 40.0]]), t([[0.0, 1.0, -9.0]]), mask, gamma=0.5, lam=0.5)
    close(adv2, adv)
    close(ret2, ret)


def test_gae_outputs_are_detached():
    values = torch.ones(1, 2, requires_grad=True)
    adv, ret = gae(values, torch.ones(1, 2), torch.ones(1, 2), gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_rloo_advantages_leave_one_out_per_prompt():
    # Two prompts, 3 responses each; returns = row sums of the masked rewards:
    # prompt 1: R = [1, 2 + 1 = 3, 5]  (row 2's third reward is padding: masked out)
    #   A_1 = 1 - (3 + 5) / 2 = -3;  A_2 = 3 - (1 + 5) / 2 = 0;  A_3 = 5 - (1 + 3) / 2 = 3
    # prompt 2: R = [-1, -1, 2]
    #   A_1 = -1 - (-1 + 2) / 2 = -1.5;  A_2 = -1.5;  A_3 = 2 - (-2) / 2 = 3
    rewards = t([[0.0, 1.0, 0.0], [2.0, 1.0, 9.0], [0.5, 0.5, 4.0],
                 [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [1.0, 1.0, 0.0]])
    mask = t([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    adv = rloo_advantages(rewards, mask, group_size=3)
    close(adv, [[-3.0, -3.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0],
                [-1.5, 0.0, 0.0], [-1.5, -1.5, 0.0], [3.0, 3.0, 3.0]])


def test_rloo_advantages_sum_to_zero_per_prompt_and_refuse_bad_groups():
    rewards, mask = torch.randn(8, 5), torch.ones(8, 5)
    adv = rloo_advantages(rewards, mask, group_size=4)
    # sum_i A_i = sum_i R_i - sum_i (S - R_i) / (k - 1) = S - (k S - S) / (k - 1) = 0
    close(adv[:, 0].view(2, 4).sum(dim=1), [0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, mask, group_size=1)
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(rewards, mask, group_size=3)


# ---------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    logprobs = t([[-1.0, -2.0, -3.0]])
    advantages = t([[1.0, -2.0, 3.0]])
    mask = t([[1, 1, 0]])
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_eps=0.2)
    close(loss, 0.5)  # -mean(1, -2) = 0.5; the padded A = 3 is ignored
    close(stats.clip_frac, 0.0)
    close(stats.approx_kl, 0.0)
    close(stats.ratio_mean, 1.0)


def test_ppo_policy_loss_clips_only_in_the_direction_that_matters():
    ratio = t([[1.5, 1.5, 0.5, 0.5, 1.1, 3.0]])
    advantages = t([[1.0, -1.0, 1.0, -1.0, 1.0, 5.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    logprobs = ratio.log().requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(1, 6), advantages, mask, clip_eps=0.2)
    # token: min(ratio*A, clip(ratio, 0.8, 1.2)*A)  -> -min   clipped branch active?
    # 1.5, +1: min(1.5, 1.2) = 1.2                   -> -1.2  yes (would push ratio further up)
    # 1.5, -1: min(-1.5, -1.2) = -1.5                -> 1.5   no  (unclipped is the pessimistic one)
    # 0.5, +1: min(0.5, 0.8) = 0.5                   -> -0.5  no
    # 0.5, -1: min(-0.5, -0.8) = -0.8                -> 0.8   yes
    # 1.1, +1: inside the band                       -> -1.1  no
    # mean = (-1.2 + 1.5 - 0.5 + 0.8 - 1.1) / 5 = -0.5 / 5 = -0.1
    close(loss, -0.1, atol=1e-5)
    close(stats.clip_frac, 2 / 5)
    close(stats.ratio_mean, 5.1 / 5, atol=1e-5)  # (1.5+1.5+0.5+0.5+1.1)/5
    # k3 = (r - 1) - ln r: 1.5 -> 0.0945349 (x2), 0.5 -> 0.1931472 (x2), 1.1 -> 0.0046898
    # (0.1890698 + 0.3862944 + 0.0046898) / 5 = 0.1160108
    close(stats.approx_kl, 0.1160108, atol=1e-5)
    loss.backward()
    # d(-ratio*A/5)/d logprob = -ratio*A/5 where unclipped, 0 where clipped (and at padding)
    close(logprobs.grad, [[0.0, 0.3, -0.1, 0.0, -0.22, 0.0]], atol=1e-5)


def test_ppo_policy_loss_clip_boundary():
    # eps = 0.2, A > 0: ratio 1.19 is inside the band, 1.21 outside
    ratio = t([[1.19, 1.21]])
    _, stats = ppo_policy_loss(ratio.log(), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    close(stats.clip_frac, 0.5)


def test_value_loss_clipping():
    old = t([[1.0, 1.0, 1.0, 1.0]])
    returns = t([[2.0, 2.0, 2.0, 2.0]])
    values = t([[1.5, 1.1, 0.5, 50.0]]).requires_grad_()
    mask = t([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    # V=1.5: (1.5-2)^2 = 0.25, clipped V 1.2: (1.2-2)^2 = 0.64 -> 0.64 (clipped larger)
    # V=1.1: inside, 0.81 both                                   -> 0.81
    # V=0.5: (0.5-2)^2 = 2.25, clipped V 0.8: 1.44               -> 2.25
    # 0.5 * (0.64 + 0.81 + 2.25) / 3 = 0.5 * 3.7 / 3 = 0.6166667
    close(loss, 0.6166667, atol=1e-5)
    close(stats.clip_frac, 1 / 3)
    close(stats.value_mean, 3.1 / 3, atol=1e-5)
    loss.backward()
    # grad = 0.5 * 2 (V - R) / 3 where unclipped: V=1.1 -> -0.9/3 = -0.3, V=0.5 -> -1.5/3 = -0.5
    close(values.grad, [[0.0, -0.3, -0.5, 0.0]], atol=1e-5)


# ---------------------------------------------------------------------------- token NLL


def _two_token_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = t([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [5.0, -5.0, 2.0]]])  # (1, 3, 3)
    labels = t([[1, 0, -100]], torch.long)  # third position is padding
    mask = t([[1, 1, 0]])
    return logits, labels, mask


def test_ptx_loss_two_tokens_three_vocab():
    logits, labels, mask = _two_token_logits()
    # token 0: uniform -> NLL = log 3 = 1.0986123
    # token 1: label 0 under logits [1, 0, 0]: lse = ln(e + 2) = ln 4.7182818 = 1.5514448,
    #          NLL = 1.5514448 - 1 = 0.5514448
    # mean = (1.0986123 + 0.5514448) / 2 = 0.8250286
    close(ptx_loss(logits, labels, mask), 0.8250286, atol=1e-5)
    close(sft_loss(logits, labels, mask), 0.8250286, atol=1e-5)


def test_ptx_loss_gradient_is_softmax_minus_onehot():
    logits, labels, mask = _two_token_logits()
    logits.requires_grad_()
    ptx_loss(logits, labels, mask).backward()
    # d/dz mean NLL = (softmax(z) - onehot(label)) / 2 for each valid token
    # token 0: ([1/3, 1/3, 1/3] - [0, 1, 0]) / 2 = [1/6, -1/3, 1/6]
    # token 1: softmax [e, 1, 1]/(e+2) = [0.5761169, 0.2119416, 0.2119416]
    #          ([-0.4238831, 0.2119416, 0.2119416]) / 2
    close(logits.grad[0, 0], [1 / 6, -1 / 3, 1 / 6])
    close(logits.grad[0, 1], [-0.2119416, 0.1059708, 0.1059708])
    close(logits.grad[0, 2], [0.0, 0.0, 0.0])


def test_response_logprobs_and_half_precision_path():
    logits, labels, _ = _two_token_logits()
    labels = labels.clamp_min(0)
    # [-log 3, 1 - ln(e + 2), 5 - ln(e^5 + e^-5 + e^2)]; the last:
    # e^5 + e^-5 + e^2 = 148.4131591 + 0.0067379 + 7.3890561 = 155.8089531, ln = 5.0486306
    lp = response_logprobs(logits, labels)
    close(lp, [[-1.0986123, -0.5514448, -0.0486306]], atol=1e-5)
    close(response_logprobs(logits.bfloat16(), labels), lp, atol=2e-2)


def test_entropy_from_logits():
    logits = t([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    # uniform over 3: log 3 = 1.0986123
    # [1, 0, 0]: H = lse - Σ p z = 1.5514448 - e/(e+2) = 1.5514448 - 0.5761169 = 0.9753279
    close(entropy_from_logits(logits), [[1.0986123, 0.9753279]], atol=1e-5)


# ---------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.02)
    ctl.update(current_kl=100.0, n_steps=10_000)
    assert ctl.value == 0.02


def test_adaptive_kl_controller_updates():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # e = clip(9/6 - 1, -0.2, 0.2) = clip(0.5) = 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    ctl.update(current_kl=9.0, n_steps=256)
    assert math.isclose(ctl.value, 0.100512, rel_tol=1e-12)
    # e = 5.7/6 - 1 = -0.05 (inside the clip); mult = 1 - 0.05 * 1000 / 10000 = 0.995
    # 0.100512 * 0.995 = 0.10000944
    ctl.update(current_kl=5.7, n_steps=1000)
    assert math.isclose(ctl.value, 0.10000944, rel_tol=1e-12)
    # e = clip(0/6 - 1) = -0.2; mult = 1 - 0.2 * 10000 / 10000 = 0.8
    ctl.update(current_kl=0.0, n_steps=10_000)
    assert math.isclose(ctl.value, 0.10000944 * 0.8, rel_tol=1e-12)


def test_adaptive_kl_controller_rejects_bad_target():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10_000)
