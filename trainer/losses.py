"""The math of the three InstructGPT steps as pure functions: tensors in, tensors out.

Conventions (shared with ``trainer.data``):

- ``mask`` is a 0/1 float tensor over response tokens on the label grid, the end-of-sequence
  token included; everything else (prompt positions, right padding) is 0. Nothing at a
  position where ``mask`` is 0 can change a result.
- A masked mean is the sum over the valid tokens of the WHOLE batch divided by their count
  (token-level, not per-row-then-per-batch); an all-zero mask gives 0, not NaN.
- Names follow the paper: ``kl_coef`` is beta, ``ptx_coef`` is the pretraining gamma,
  ``gamma``/``lam`` are GAE's discount and lambda, ``clip_eps`` is PPO's epsilon.
- Functions that report diagnostics return ``(loss, stats)``; stats are NamedTuples of
  detached 0-dim tensors (the caller decides when to sync them to Python floats).

The KL controllers at the end hold one float of state; everything else is stateless.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- masked stats


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over valid tokens. Shape: x, mask (..., T)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid tokens (over the whole tensor when ``dim`` is None).

    Shape: x, mask (..., T). An empty mask (or an empty row, with ``dim``) gives 0.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid tokens (0-dim). Shape: x, mask (..., T).

    ``unbiased`` applies Bessel's correction n / (n - 1); with a single valid token it is
    skipped (the variance is then 0 rather than NaN).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over valid tokens; padding stays 0.

    Shape: x, mask (..., T) -> (..., T). With ``shift_mean=False`` the mean is added back
    (only the scale changes), as is usual for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def whiten_from_sums(x: torch.Tensor, mask: torch.Tensor, n: float, total: float, total_sq: float) -> torch.Tensor:
    """``masked_whiten`` with the mean and the (unbiased) variance taken from sums over valid
    tokens that may span more tensors than ``x`` (every rank's batch): n tokens, their sum and
    their sum of squares. Shape: x, mask (..., T) -> (..., T)."""
    mean = total / n if n > 0 else 0.0
    var = (total_sq - n * mean * mean) / max(n - 1.0, 1.0) if n > 1 else 0.0
    return (x - mean) * (1.0 / math.sqrt(max(var, 0.0) + 1e-8)) * mask


# ---------------------------------------------------------------------------- step 2: RM


class RankingStats(NamedTuple):
    """Detached diagnostics of the K-way ranking loss."""

    accuracy: torch.Tensor  # fraction of ordered pairs with r_better > r_worse (ties = wrong)
    num_pairs: torch.Tensor  # ordered pairs in the batch
    margin: torch.Tensor  # mean of r_better - r_worse over ordered pairs


def ranked_pair_mask(ranks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Which (i, j) are ordered pairs: ``ranks[i] < ranks[j]`` (i better), both valid.

    Shape: ranks (..., K), valid (..., K) 0/1 -> (..., K, K) bool. Ties give no pair.
    """
    pairs = ranks.unsqueeze(-1) < ranks.unsqueeze(-2)  # (..., K, K)
    if valid is not None:
        ok = valid.bool()
        pairs = pairs & ok.unsqueeze(-1) & ok.unsqueeze(-2)
    return pairs


def ranking_pair_accuracy(
    rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of ordered pairs the rewards put in the labeler's order, pooled over pairs.

    Shape: rewards, ranks, valid (..., K) -> 0-dim. A reward tie counts as wrong. Detached.
    """
    pairs = ranked_pair_mask(ranks, valid)
    right = (rewards.unsqueeze(-1) > rewards.unsqueeze(-2)) & pairs
    return (right.sum() / pairs.sum().clamp_min(1)).detach().float()


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The paper's RM loss for ONE prompt: mean over ordered pairs of -log sigma(r_i - r_j).

    Shape: rewards (K,), ranks (K,) with lower = better and equal ranks for ties -> 0-dim.
    Without ties this is -1/C(K,2) * sum log sigma(r(x, y_w) - r(x, y_l)); tied pairs are
    left out of both the sum and the count. Raises ValueError when no pair is ordered.
    """
    if rewards.dim() != 1 or rewards.shape != ranks.shape:
        shapes = f"{tuple(rewards.shape)} and {tuple(ranks.shape)}"
        raise ValueError(f"rewards and ranks must both be (K,), got {shapes}")
    pairs = ranked_pair_mask(ranks)  # (K, K), pairs[i, j]: i ranked above j
    if not pairs.any():
        raise ValueError("ranking has no ordered pair (all completions tied or K < 2)")
    margins = rewards.unsqueeze(1) - rewards.unsqueeze(0)  # (K, K), r_i - r_j
    return -F.logsigmoid(margins[pairs]).mean()


def batched_ranking_loss(
    rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, RankingStats]:
    """The RM loss over P prompts: each prompt's mean over its pairs, then the mean over prompts.

    Shape: rewards, ranks, valid (P, Kmax); ``valid`` is 0/1, 0 at padding completions.
    Each prompt weighs the same whatever its K (one batch element per prompt, as in the
    paper). Raises ValueError if some prompt has no ordered pair.
    """
    pairs = ranked_pair_mask(ranks, valid)  # (P, K, K)
    pair_counts = pairs.sum(dim=(1, 2))  # (P,)
    if (pair_counts == 0).any():
        empty = (pair_counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"prompts {empty} have no ordered pair (all tied or fewer than 2 valid)")
    # Zero the padded rewards first: they may hold anything (inf, NaN), and a NaN margin
    # would poison the gradient even where its pair is masked out.
    rewards = torch.where(valid.bool(), rewards, torch.zeros_like(rewards))
    margins = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (P, K, K), r_i - r_j
    pair_nll = -F.logsigmoid(margins) * pairs
    per_prompt = pair_nll.sum(dim=(1, 2)) / pair_counts  # (P,)
    loss = per_prompt.mean()
    with torch.no_grad():
        num_pairs = pair_counts.sum()
        stats = RankingStats(
            accuracy=ranking_pair_accuracy(rewards, ranks, valid),
            num_pairs=num_pairs,
            margin=(margins * pairs).sum() / num_pairs,
        )
    return loss, stats


# ---------------------------------------------------------------------------- step 3: rewards


def compute_approx_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    Shape: logprobs, ref_logprobs, mask (B, T) -> (B, T), 0 where ``mask`` is 0.
    With log_ratio = log pi - log pi_ref:
      k1 = log_ratio                          (unbiased, can be negative; the paper's penalty)
      k2 = 0.5 * log_ratio^2                  (biased, low variance)
      k3 = exp(-log_ratio) - 1 + log_ratio    (unbiased, >= 0)
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"Unknown KL estimator: {estimator}")
    return kl if mask is None else kl * mask


class KLSummary(NamedTuple):
    """A sample-based KL(pi || pi_ref) estimate, per token and per sequence (detached)."""

    per_token: torch.Tensor  # token-level masked mean of the estimator
    per_sequence: torch.Tensor  # mean over rows of each row's sum
    num_tokens: torch.Tensor


def kl_summary(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
               ) -> KLSummary:
    """KL(pi || pi_ref) from tokens SAMPLED from pi, with ``compute_approx_kl``'s ``estimator``.

    Shape: logprobs, ref_logprobs, mask (B, T) -> three 0-dim tensors. Only samples from pi
    make this an estimate of KL(pi || pi_ref): greedy answers are not samples.
    """
    kl = compute_approx_kl(logprobs, ref_logprobs, mask, estimator)  # (B, T)
    return KLSummary(per_token=masked_mean(kl, mask).detach(), per_sequence=kl.sum(dim=-1).mean().detach(),
                     num_tokens=mask.sum().detach())


def last_valid_onehot(mask: torch.Tensor) -> torch.Tensor:
    """1 at each row's last valid token, else 0 (all 0 for an empty row). Shape: (B, T) -> (B, T)."""
    positions = torch.arange(mask.shape[-1], device=mask.device, dtype=mask.dtype)  # (T,)
    last = (positions * mask).argmax(dim=-1)  # (B,)
    return F.one_hot(last, mask.shape[-1]).to(mask.dtype) * mask


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """Per-token PPO rewards: -beta * KL_t at every token, the RM score at the last.

    Shape: scores (B,); logprobs, ref_logprobs, mask (B, T) -> (B, T), 0 where ``mask`` is 0.
    KL_t is ``compute_approx_kl(..., kl_estimator)``: with "k1" (the paper's) it is
    log(pi_RL / pi_SFT). The score lands on each row's last VALID token (the EOS), not on column T - 1.
    """
    # r_t = -kl_coef * KL_t + [t == last] * score
    kl_penalty = -kl_coef * compute_approx_kl(logprobs, ref_logprobs, mask, estimator=kl_estimator)
    return kl_penalty + scores.unsqueeze(-1) * last_valid_onehot(mask)


@torch.no_grad()
def gae(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    Shape: values, rewards, mask (B, T) -> two (B, T), detached, 0 where ``mask`` is 0.
    The value after a row's last valid token is 0 (the episode ends with the response).
    """
    values, rewards = values * mask, rewards * mask
    T = values.shape[-1]
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[..., 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[..., t + 1] if t + 1 < T else torch.zeros_like(next_advantage)
        # delta_t = r_t + gamma * V(s_{t+1}) - V(s_t); padding has V = 0, so the tail is cut
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        # A_t = delta_t + gamma * lam * A_{t+1}
        next_advantage = delta + gamma * lam * next_advantage
        advantages[..., t] = next_advantage
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024; OpenRLHF's ``rloo``): each
    response's return (the sum of its per-token rewards: the RM score minus the KL penalty)
    minus the mean return of the OTHER responses to the same prompt, on every one of its tokens.

    Shape: rewards, mask (B, T) -> (B, T), detached, 0 where ``mask`` is 0. Rows come in groups
    of ``group_size`` (>= 2) consecutive responses to one prompt; B must be a multiple of it.
    With returns R_1..R_k of one prompt: A_i = R_i - (sum_j R_j - R_i) / (k - 1).
    """
    if group_size < 2:
        raise ValueError(f"rloo needs at least 2 responses per prompt, got group_size={group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rows do not split into groups of {group_size}")
    returns = (rewards * mask).sum(dim=-1).view(-1, group_size)  # (B / k, k)
    baseline = (returns.sum(dim=-1, keepdim=True) - returns) / (group_size - 1)
    return (returns - baseline).reshape(-1, 1) * mask


# ---------------------------------------------------------------------------- step 3: PPO


class PolicyLossStats(NamedTuple):
    """Detached diagnostics of the clipped policy objective."""

    clip_frac: torch.Tensor  # fraction of valid tokens where the clipped branch is active
    approx_kl: torch.Tensor  # masked mean of k3 for KL(pi_old || pi_new)
    ratio_mean: torch.Tensor  # masked mean of pi_new / pi_old


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO's clipped surrogate, negated to a loss: masked mean of -min(ratio A, clip(ratio) A).

    Shape: logprobs, old_logprobs, advantages, mask (B, T) -> 0-dim.
    ``clip_frac`` counts the valid tokens where clip(ratio) * A < ratio * A strictly, i.e.
    ratio > 1 + eps with A > 0 or ratio < 1 - eps with A < 0: exactly the tokens whose
    gradient the clip zeroes. ``approx_kl`` is the k3 estimate of KL(pi_old || pi_new) on
    tokens sampled from pi_old: (ratio - 1) - log(ratio), >= 0.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # (B, T)
    surrogate = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = masked_mean(-torch.min(surrogate, clipped), mask)
    with torch.no_grad():
        stats = PolicyLossStats(
            clip_frac=masked_mean((clipped < surrogate).to(mask.dtype), mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


class ValueLossStats(NamedTuple):
    """Detached diagnostics of the clipped value loss."""

    clip_frac: torch.Tensor  # fraction of valid tokens where the clipped error is the larger
    value_mean: torch.Tensor  # masked mean of the new values


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, ValueLossStats]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2).

    Shape: values, old_values, returns, mask (B, T) -> 0-dim, where
    V_clipped = V_old + clip(V - V_old, -eps, eps). ``clip_frac`` counts valid tokens where
    the clipped error is strictly larger (the max picks it; V gets no gradient there).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    error = (values - returns) ** 2
    error_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(error, error_clipped), mask)
    with torch.no_grad():
        stats = ValueLossStats(
            clip_frac=masked_mean((error_clipped > error).to(mask.dtype), mask),
            value_mean=masked_mean(values, mask),
        )
    return loss, stats


# ---------------------------------------------------------------------------- token log-probs


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position. Shape: logits (B, T, V), labels (B, T) -> (B, T).

    ``logits`` must already be aligned with ``labels`` (see ``trainer.data.shift_for_labels``).
    Computed as logit[label] - logsumexp(logits), which never materialises a (B, T, V)
    log-softmax; labels must be valid vocabulary ids (mask them before, not with -100).
    """
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if logits.dtype in (torch.float32, torch.float64):
        return picked - torch.logsumexp(logits, dim=-1)
    # Half precision loses too much in logsumexp; upcast one row at a time to bound memory.
    return torch.stack(
        [torch.gather(F.log_softmax(row.float(), dim=-1), -1, lab.unsqueeze(-1)).squeeze(-1)
         for row, lab in zip(logits, labels)]
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. Shape: (B, T, V) -> (B, T)."""
    # H = -sum p log p = logsumexp(z) - sum p z
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean negative log-likelihood of ``labels``; PPO-ptx adds ``ptx_coef * ptx_loss``.

    Shape: logits (B, T, V) aligned with labels (B, T) (the caller shifts), mask (B, T)
    -> 0-dim. Labels at masked positions are ignored (they may be -100 or anything).
    """
    safe_labels = labels.masked_fill(mask == 0, 0)
    return masked_mean(-response_logprobs(logits, safe_labels), mask)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SFT's loss: the same masked token NLL as ``ptx_loss``, on demonstration responses.

    Shape: logits (B, T, V), labels (B, T), mask (B, T) -> 0-dim.
    """
    return ptx_loss(logits, labels, mask)


# ---------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant beta (the paper's runs: 0.02)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Ziegler et al. (2019): move beta to keep the measured KL near ``target``.

    Per update: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon,
    where ``n_steps`` counts the episodes (responses) since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
