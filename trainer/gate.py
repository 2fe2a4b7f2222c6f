"""Evaluate a candidate policy against the serving one, and decide whether to promote it.

The judge is a reward model PPO did NOT optimise against (the cycle trains it on the
validation-split comparisons): PPO's own RM is exploitable by construction, so a win rate
measured with it would reward reward hacking. Both policies answer the same held-out
prompts (greedy by default); the judge scores both answers; the candidate wins a prompt
when its answer scores higher (a tie counts half). Beside the win rate the gate bounds

- the KL from the SFT reference (sum over response tokens of log pi - log pi_ref on the
  candidate's own answers): how far the candidate drifted from its lineage's SFT model;
- the ptx regression: held-out pretraining NLL of the candidate minus the serving
  policy's (the "alignment tax" PPO-ptx exists to limit), in nats per token.

Optionally, a one-sided sign test (wins among untied prompts ~ Binomial(n, 1/2)) must
reach ``max_p_value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainer.data import PromptExample

# torch and transformers are imported inside evaluate_candidate: the config half of this
# module is imported by `rlhf trainer --help` and the service, which must start fast.


def _check(condition: bool, name: str, message: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{name} {message}, got {value!r}")


@dataclass
class GateConfig:
    """Bounds a candidate must meet to be promoted (all of them)."""

    min_win_rate: float = field(
        default=0.5,
        metadata={"help": "Least judge win rate against the serving policy (ties count half); 0 disables."})
    max_p_value: float | None = field(
        default=None,
        metadata={"help": "Most one-sided sign-test p-value for 'candidate beats serving'; None = not required."})
    max_kl: float | None = field(
        default=20.0, metadata={"help": "Most KL (nats per response) from the SFT reference; None = no bound."})
    max_ptx_regression: float | None = field(
        default=0.25,
        metadata={"help": "Most increase of held-out pretraining NLL (nats/token) over the serving policy; "
                  "None = no bound."})
    max_empty_fraction: float | None = field(
        default=None,
        metadata={"help": "Most share of evaluation prompts the candidate answers with nothing (a policy that "
                  "collapsed onto an immediate EOS can fool a weak judge); None = no bound."})

    def __post_init__(self) -> None:
        _check(0 <= self.min_win_rate <= 1, "min_win_rate", "must be in [0, 1]", self.min_win_rate)
        _check(self.max_p_value is None or 0 < self.max_p_value <= 1, "max_p_value", "must be in (0, 1] or None",
               self.max_p_value)
        _check(self.max_kl is None or self.max_kl >= 0, "max_kl", "must be >= 0 or None", self.max_kl)
        _check(self.max_empty_fraction is None or 0 <= self.max_empty_fraction <= 1, "max_empty_fraction",
               "must be in [0, 1] or None", self.max_empty_fraction)


@dataclass
class GateDecision:
    """Whether to promote, and every check with its value and bound."""

    promote: bool
    checks: dict[str, dict[str, Any]]

    @property
    def reason(self) -> str:
        failed = [f"{name} {c['value']:.4g} {c['op']} {c['bound']:.4g} failed" for name, c in self.checks.items()
                  if not c["passed"]]
        return "; ".join(failed) if failed else "all checks passed"

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "checks": self.checks}


def decide(evaluation: dict[str, Any], config: GateConfig) -> GateDecision:
    """Apply the bounds of ``config`` to the metrics of ``evaluate_candidate``."""
    bounds = [("win_rate", evaluation["judge_win_rate"], ">=", config.min_win_rate),
              ("p_value", evaluation["p_value"], "<=", config.max_p_value),
              ("kl_to_sft", evaluation["kl_to_sft"], "<=", config.max_kl),
              ("ptx_regression", evaluation["ptx_regression"], "<=", config.max_ptx_regression),
              ("empty_fraction", evaluation.get("empty_fraction_candidate"), "<=", config.max_empty_fraction)]
    checks = {}
    for name, value, op, bound in bounds:
        if bound is None or value is None:
            continue
        passed = value >= bound if op == ">=" else value <= bound
        checks[name] = {"value": value, "op": op, "bound": bound, "passed": bool(passed and math.isfinite(value))}
    return GateDecision(all(c["passed"] for c in checks.values()), checks)


# ---------------------------------------------------------------------------- measuring


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
    num_examples: int = 3,
) -> dict[str, Any]:
    """Sample both policies on ``prompts``, score with the judge (and, for reference, the
    PPO reward model), measure KL to the SFT reference and the ptx NLL of both."""
    import torch

    from common.models import load_causal_lm, load_tokenizer
    from trainer.evaluate import binomial_sf_one_sided, kl_to_reference, ptx_eval_loss, sample_responses, win_rate
    from trainer.reward_model import RewardModel

    if not prompts:
        raise ValueError("no evaluation prompts")
    tokenizer = load_tokenizer(candidate_dir, padding_side="right")
    candidate, serving = load_causal_lm(candidate_dir), load_causal_lm(serving_dir)
    messages = [p.messages for p in prompts]

    def answers(model: torch.nn.Module) -> list[str]:
        return sample_responses(model, tokenizer, messages, max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=seed, batch_size=batch_size)

    cand_text, serve_text = answers(candidate), answers(serving)
    scores = {}
    for name, folder in (("judge", judge_dir), ("rm", rm_dir)):
        rm = RewardModel.load(folder)
        scores[name] = (rm.score_texts(rm.tokenizer, messages, cand_text, batch_size=batch_size),
                        rm.score_texts(rm.tokenizer, messages, serve_text, batch_size=batch_size))
        del rm
    judge_c, judge_s = scores["judge"]
    wins, losses = int((judge_c > judge_s).sum()), int((judge_c < judge_s).sum())
    ptx_candidate = ptx_eval_loss(candidate, tokenizer, ptx_texts, ptx_max_length, batch_size) if ptx_texts else None
    ptx_serving = ptx_eval_loss(serving, tokenizer, ptx_texts, ptx_max_length, batch_size) if ptx_texts else None
    del serving
    reference = load_causal_lm(reference_dir)
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
        "kl_to_sft": kl_to_reference(candidate, reference, tokenizer, messages, cand_text, batch_size=batch_size),
        "ptx_nll_candidate": ptx_candidate,
        "ptx_nll_serving": ptx_serving,
        "ptx_regression": None if ptx_candidate is None else ptx_candidate - ptx_serving,
        "empty_fraction_candidate": sum(not t.strip() for t in cand_text) / len(cand_text),
        "mean_words_candidate": _mean_words(cand_text),
        "mean_words_serving": _mean_words(serve_text),
        "examples": [{"prompt": m[-1]["content"], "candidate": c, "serving": s}
                     for m, c, s in zip(messages[:num_examples], cand_text, serve_text)],
    }


def _mean_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)
