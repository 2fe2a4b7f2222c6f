"""Evaluation helpers the cycle uses to judge a candidate policy and a reward model.

- ``pairwise_accuracy``: RM agreement with held-out rankings, overall and per labeler group
  (the paper checks held-out labelers: 72.4% vs 69.6%).
- ``win_rate`` and ``binomial_sf_one_sided``: does the candidate beat the incumbent, and
  how surprising would that be under a fair coin.
- ``kl_to_reference``: how far the policy moved from the SFT reference on its own samples.
- ``ptx_eval_loss``: held-out pretraining NLL, the "alignment tax" PPO-ptx guards against.
- ``sample_responses``: batched HF generation with left padding.

Functions take models and plain arguments; none writes files or logs.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from trainer.data import Comparison, Messages, PromptExample, encode_response, pack_sequences, render_prompt
from trainer.losses import ptx_loss, ranked_pair_mask, response_logprobs


class Scorer(Protocol):
    """What ``pairwise_accuracy`` needs of a reward model."""

    def score_texts(self, tokenizer: Any, prompts: list[Messages], responses: list[str],
                    batch_size: int = ...) -> torch.Tensor: ...


def as_messages(prompt: Messages | PromptExample | str) -> Messages:
    """A chat for any of the prompt forms the trainer meets."""
    if isinstance(prompt, PromptExample):
        return prompt.messages
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},)
    return tuple(prompt)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off and no autograd inside the block; the previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------- RM accuracy


def pair_outcomes(scores: torch.Tensor, ranks: Sequence[int]) -> tuple[int, int]:
    """(right, total) over one comparison's ordered pairs. Shape: scores (K,).

    A pair counts as right when the better-ranked completion scores strictly higher (a
    score tie is wrong, as in ``trainer.losses.ranking_pair_accuracy``); tied ranks give no pair.
    """
    ranks_t = torch.tensor(list(ranks))
    pairs = ranked_pair_mask(ranks_t)  # (K, K)
    right = (scores.unsqueeze(1) > scores.unsqueeze(0)) & pairs
    return int(right.sum()), int(pairs.sum())


def accuracy_by_group(per_comparison_scores: Sequence[torch.Tensor], comparisons: Sequence[Comparison]) -> dict:
    """Pairwise accuracy pooled over pairs: overall and per ``labeler_group``.

    Returns ``{"accuracy", "num_pairs", "num_comparisons", "by_group": {group: {"accuracy",
    "num_pairs", "num_comparisons"}}}``; accuracy is None where there is no ordered pair.
    """
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for scores, comparison in zip(per_comparison_scores, comparisons, strict=True):
        r, t = pair_outcomes(scores, comparison.ranks)
        right[comparison.labeler_group] += r
        total[comparison.labeler_group] += t
        count[comparison.labeler_group] += 1

    def summary(r: int, t: int, c: int) -> dict:
        return {"accuracy": r / t if t else None, "num_pairs": t, "num_comparisons": c}

    overall = summary(sum(right.values()), sum(total.values()), sum(count.values()))
    overall["by_group"] = {g: summary(right[g], total[g], count[g]) for g in sorted(total)}
    return overall


def pairwise_accuracy(rm: Scorer, tokenizer: Any, comparisons: Sequence[Comparison], batch_size: int = 16) -> dict:
    """Score every completion once and report pairwise accuracy overall and per labeler group."""
    prompts = [c.messages for c in comparisons for _ in c.completions]
    responses = [text for c in comparisons for text in c.completions]
    if not responses:
        return accuracy_by_group([], [])
    flat = rm.score_texts(tokenizer, prompts, responses, batch_size=batch_size).float().cpu()  # (N,)
    per_comparison = list(torch.split(flat, [len(c.completions) for c in comparisons]))
    return accuracy_by_group(per_comparison, comparisons)


# ---------------------------------------------------------------------------- preference tests


def win_rate(scores_a: torch.Tensor, scores_b: torch.Tensor) -> float:
    """Fraction of items where A beats B, a tie counting half. Shape: scores_a, scores_b (N,)."""
    if scores_a.shape != scores_b.shape or scores_a.dim() != 1 or scores_a.numel() == 0:
        raise ValueError(f"need two non-empty (N,) tensors, got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}")
    wins = (scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()  # (N,)
    return float(wins.mean())


def binomial_sf_one_sided(k: int, n: int, p: float = 0.5) -> float:
    """Exact P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k wins in n trials."""
    if n < 0 or not 0 <= p <= 1:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    # sum_{i=k}^{n} C(n, i) p^i (1 - p)^(n - i)
    return min(1.0, math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


# ---------------------------------------------------------------------------- policy metrics


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def kl_to_reference(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Messages | PromptExample],
    responses: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
) -> float:
    """Mean over responses of sum_t log pi(y_t) - log pi_ref(y_t): a Monte Carlo KL(pi || pi_ref)
    when the responses were sampled from ``policy``."""
    prompt_ids = [render_prompt(tokenizer, as_messages(p)) for p in prompts]
    response_ids = [encode_response(tokenizer, r) for r in responses]
    per_sequence: list[torch.Tensor] = []
    with eval_mode(policy), eval_mode(ref):
        for part in _chunks(len(prompt_ids), batch_size):
            batch = pack_sequences(prompt_ids[part], response_ids[part], tokenizer.pad_token_id, max_length)
            logp = _sequence_logprobs(policy, batch)  # (B, T-1)
            ref_logp = _sequence_logprobs(ref, batch)
            mask = batch.response_mask[:, 1:].to(logp.device)
            per_sequence.append(((logp - ref_logp) * mask).sum(dim=1).cpu())  # (B,)
    return float(torch.cat(per_sequence).mean()) if per_sequence else 0.0


def _sequence_logprobs(model: torch.nn.Module, batch) -> torch.Tensor:
    """log pi(token t | < t) on the label grid. Shape: batch (B, T) -> (B, T-1), float32."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return response_logprobs(logits[:, :-1, :].float(), batch.input_ids[:, 1:])


def ptx_eval_loss(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 8
) -> float:
    """Token-level mean NLL of held-out plain texts (each cut to ``max_length`` tokens)."""
    total_nll, total_tokens = 0.0, 0.0
    device = model_device(model)
    with eval_mode(model):
        for part in _chunks(len(texts), batch_size):
            encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts[part]]
            encoded = [ids for ids in encoded if len(ids) >= 2]
            if not encoded:
                continue
            # pack_sequences with empty prompts: response_mask marks every real token.
            batch = pack_sequences([[] for _ in encoded], encoded, tokenizer.pad_token_id).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            mask = batch.response_mask[:, 1:]  # (B, T-1)
            tokens = float(mask.sum())
            total_nll += float(ptx_loss(logits[:, :-1, :].float(), batch.input_ids[:, 1:], mask)) * tokens
            total_tokens += tokens
    if total_tokens == 0:
        raise ValueError("no text has 2 or more tokens")
    return total_nll / total_tokens


def sample_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Messages | PromptExample],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[str]:
    """One response per prompt (greedy when ``temperature`` is 0), decoded without special tokens.

    Batched with LEFT padding so every row's new tokens start at the same column. Sampling
    uses a private RNG stream seeded with ``seed``: the caller's global RNG is untouched.
    """
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    sampling = temperature > 0
    options: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": max_new_tokens,
                               "pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id}
    if sampling:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
    texts: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for part in _chunks(len(prompts), batch_size):
            rows = [render_prompt(tokenizer, as_messages(p)) for p in prompts[part]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, width - len(row):] = torch.tensor(row)
                attention_mask[i, width - len(row):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
            texts.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return texts
