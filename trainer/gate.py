"""Decide whether to promote a candidate policy, from the numbers ``trainer.evaluate.evaluate_candidate``
measured (pure: a dict in, a decision out).

The judge is a second reward model, trained apart from PPO's (the cycle trains it on the
training labelers' rankings of every prompt the gate does not evaluate on, or with
``data.judge_rankings = "val"`` on the val split's alone, data PPO's RM never saw): PPO's
own RM is exploitable by construction, so a win rate measured with it would reward reward
hacking; the held-in judge is a different model on more data, and replayed on demo runs it
agreed with the noise-free rule more often than the val-split judge (bench.gate_power).
Both policies answer the same evaluation prompts (greedy by default); the judge scores
both answers; the candidate wins a prompt when its answer scores higher (a tie counts
half). The judge's verdict counts only when the judge itself is better than chance: its
pairwise accuracy on rankings it never trained on must reach ``min_judge_accuracy`` (a
judge at chance promotes nothing). Beside the win rate the gate bounds

- the KL from the SFT reference, per token, measured on the candidate's own SAMPLES with
  PPO's estimator (``PPOConfig.kl_estimator``): how far it drifted from its lineage's SFT model;
- the ptx regression: held-out pretraining NLL of the candidate minus the serving
  policy's (the "alignment tax" PPO-ptx exists to limit), in nats per token;
- optionally the share of empty answers, and a one-sided sign test (wins among untied
  prompts ~ Binomial(n, 1/2)) that must reach ``max_p_value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainer.config import _check


@dataclass
class GateConfig:
    """Bounds a candidate must meet to be promoted (all of them)."""

    min_win_rate: float = field(
        default=0.5,
        metadata={"help": "The judge win rate against the serving policy (ties count half) must EXCEED this: at "
                  "0.5 a candidate the judge finds no better than the serving policy (a tie) is not promoted; "
                  "0 disables."})
    max_p_value: float | None = field(
        default=None,
        metadata={"help": "Most one-sided sign-test p-value for 'candidate beats serving'; None = not required."})
    min_judge_accuracy: float | None = field(
        default=0.55,
        metadata={"help": "Least pairwise accuracy of the judge on rankings it never trained on (the training "
                  "labelers' newest train-split ones, the held-out labelers', and those of the evaluation "
                  "prompts): below it the judge cannot tell better from worse and nothing is promoted; None = "
                  "no bound."})
    max_kl_per_token: float | None = field(
        default=0.5,
        metadata={"help": "Most KL from the SFT reference in nats per response token, on the candidate's own "
                  "samples with PPO's kl_estimator; None = no bound."})
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
        _check(self.max_kl_per_token is None or self.max_kl_per_token >= 0, "max_kl_per_token", "must be >= 0 or None",
               self.max_kl_per_token)
        _check(self.min_judge_accuracy is None or 0 <= self.min_judge_accuracy <= 1, "min_judge_accuracy",
               "must be in [0, 1] or None", self.min_judge_accuracy)
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
    """Apply the bounds of ``config`` to the metrics of ``evaluate_candidate`` (plus the judge's
    accuracy, ``judge_accuracy``: a bound with no measured value fails)."""
    bounds = [("judge_accuracy", evaluation.get("judge_accuracy"), ">=", config.min_judge_accuracy),
              # strictly above: a candidate the judge cannot tell from the serving policy is not better
              ("win_rate", evaluation["judge_win_rate"], ">", config.min_win_rate or None),
              ("p_value", evaluation["p_value"], "<=", config.max_p_value),
              ("kl_to_sft", evaluation["kl_to_sft"], "<=", config.max_kl_per_token),
              ("ptx_regression", evaluation["ptx_regression"], "<=", config.max_ptx_regression),
              ("empty_fraction", evaluation.get("empty_fraction_candidate"), "<=", config.max_empty_fraction)]
    checks = {}
    for name, value, op, bound in bounds:
        if bound is None or (value is None and name != "judge_accuracy"):
            continue
        if value is None:  # a judge that could not be measured cannot vouch for anything
            value = math.nan
        passed = value >= bound if op == ">=" else value > bound if op == ">" else value <= bound
        checks[name] = {"value": value, "op": op, "bound": bound, "passed": bool(passed and math.isfinite(value))}
    return GateDecision(all(c["passed"] for c in checks.values()), checks)
