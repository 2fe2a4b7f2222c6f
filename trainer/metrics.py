"""Prometheus metrics of the trainer, on their own HTTP port (`TrainerConfig.metrics_port`,
0 = off; `rlhf trainer --set metrics_port=9101`).

Like the server's (``server.metrics``): a private registry, plain HTTP on `metrics_host`,
loopback by default (the endpoint has no authentication: a scraper on another machine needs
`--set metrics_host=0.0.0.0`). The trainer has no TLS of its own, so it never speaks HTTPS.

What is recorded, and when. ``trainer.cycle.StageLog`` calls ``stage_started`` and
``stage_ended`` (with the metrics dict the stage recorded in the store) for every stage,
and ``run_cycle`` calls ``cycle_ended`` with the final state. The gauges read from a
stage's metrics show the last cycle that COMPLETED that stage (a stage that raised records
only its duration); a figure that stage did not measure (no ptx term, say) reads NaN.

Label cardinality stays bounded: `stage` is one of the recipe's ten stages, `state` one of
four final states, `reason` one of the gate's six checks or "passed", `model` rm or judge;
`group` is a labeler group, which operators define (a handful); beyond ``MAX_GROUPS`` the
groups with the fewest measured pairs are left out (logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, ProcessCollector, start_http_server

log = logging.getLogger(__name__)

STAGES = ("snapshot", "hygiene", "sft", "rm", "ppo", "evaluate", "gate", "publish", "swap", "record")
FINAL_STATES = ("promoted", "rejected", "skipped", "failed")
# trainer.gate.decide's checks, in its order: a rejection's reason is the first that failed.
GATE_CHECKS = ("judge_accuracy", "win_rate", "p_value", "kl_to_sft", "ptx_regression", "empty_fraction")
REWARD_MODELS = ("rm", "judge")
MAX_GROUPS = 32
# Seconds: a stage spans milliseconds (gate) to hours (PPO of a 7B policy).
STAGE_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)


class TrainerMetrics:
    """The trainer's metrics, in a registry of their own."""

    def __init__(self, held_out_groups: Iterable[str] = ()) -> None:
        self.held_out_groups = frozenset(held_out_groups)
        self.registry = CollectorRegistry()
        r = self.registry
        # CPU seconds and resident memory: what a trainer sharing a machine is budgeted by.
        ProcessCollector(registry=r)
        self.cycles = Counter("rlhf_trainer_cycles", "Cycles this trainer process ran to an end, by final state",
                              ["state"], registry=r)
        self.last_cycle_end = Gauge("rlhf_trainer_last_cycle_end_timestamp_seconds",
                                    "Unix time the last cycle of each final state ended", ["state"], registry=r)
        for state in FINAL_STATES:  # every state has a series from the start: rate() needs the zero
            self.cycles.labels(state=state)
        self.stage = Enum("rlhf_trainer_stage", "The stage the running cycle is in (idle: none runs)",
                          states=("idle", *STAGES), registry=r)
        self.stage_seconds = Histogram("rlhf_trainer_stage_seconds", "Wall seconds per stage, failed ones included",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.rm_accuracy = Gauge("rlhf_trainer_rm_accuracy",
                                 "Pairwise accuracy on rankings the model never trained on (rm: val split and "
                                 "held-out groups; judge: its unseen rankings), per labeler group; group=\"\" is "
                                 "all of them", ["model", "group", "held_out"], registry=r)
        self.rm_accuracy_pairs = Gauge("rlhf_trainer_rm_accuracy_pairs",
                                       "Ordered pairs behind rlhf_trainer_rm_accuracy (how noisy it is)",
                                       ["model", "group", "held_out"], registry=r)
        self.ppo_rm_score = Gauge("rlhf_trainer_ppo_rm_score",
                                  "Mean reward-model score of the last PPO iteration's rollouts", registry=r)
        self.ppo_kl = Gauge("rlhf_trainer_ppo_kl", "KL to the SFT reference in the last PPO iteration, nats per "
                            "sequence (PPO's estimator, before the update)", registry=r)
        self.ppo_ptx_loss = Gauge("rlhf_trainer_ppo_ptx_loss",
                                  "Pretraining NLL (nats/token) in the last PPO iteration", registry=r)
        self.kl_to_sft = Gauge("rlhf_trainer_kl_to_sft",
                               "Candidate's KL to its SFT reference on its own samples, nats per token "
                               "(evaluate; the gate bounds it)", registry=r)
        self.judge_win_rate = Gauge("rlhf_trainer_judge_win_rate",
                                    "Candidate's win rate against the serving policy, judged by the judge RM",
                                    registry=r)
        self.ptx_regression = Gauge("rlhf_trainer_ptx_regression",
                                    "Held-out pretraining NLL of the candidate minus the serving policy's "
                                    "(nats/token)", registry=r)
        self.gate_decisions = Counter("rlhf_trainer_gate_decisions",
                                      "Gate decisions; reason: passed, or the first failed check",
                                      ["decision", "reason"], registry=r)
        self.gate_check_failures = Counter("rlhf_trainer_gate_check_failures", "Failed gate checks, by check",
                                           ["check"], registry=r)
        self._http: Any = None
        self._recorders: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "rm": self.record_reward_models, "ppo": self.record_ppo, "evaluate": self.record_evaluation,
            "gate": self.record_gate}

    # ------------------------------------------------------------------ from the cycle

    def stage_started(self, name: str) -> None:
        if name in STAGES:
            self.stage.state(name)

    def stage_ended(self, name: str, metrics: Mapping[str, Any]) -> None:
        """Record a stage's duration and its figures; never raises (a metric must not fail a cycle)."""
        try:
            if name in STAGES and isinstance(metrics.get("seconds"), (int, float)):
                self.stage_seconds.labels(stage=name).observe(metrics["seconds"])
            recorder = self._recorders.get(name)
            if recorder is not None:
                recorder(metrics)
        except Exception:  # noqa: BLE001 - an unexpected shape of a stage's metrics
            log.warning("metrics of stage %s not recorded", name, exc_info=True)

    def cycle_ended(self, state: str) -> None:
        if state in FINAL_STATES:
            self.cycles.labels(state=state).inc()
            self.last_cycle_end.labels(state=state).set_to_current_time()
        self.stage.state("idle")

    # ------------------------------------------------------------------ per stage
    # A key absent from a stage's metrics means the stage did not get that far: the
    # gauge keeps its value. A key present but None means "not measured": NaN.

    def record_reward_models(self, metrics: Mapping[str, Any]) -> None:
        """The rm stage: each model's ``val`` accuracy (``trainer.evaluate.accuracy_by_group``)."""
        measured = {model: metrics[model]["val"] for model in REWARD_MODELS if "val" in metrics.get(model, {})}
        if not measured:
            return
        self.rm_accuracy.clear()  # a group without rankings this cycle must not linger
        self.rm_accuracy_pairs.clear()
        for model, val in measured.items():
            self._set_accuracy(model, "", "", val)
            for group, figures in kept_groups(val.get("by_group", {}), MAX_GROUPS, model).items():
                self._set_accuracy(model, group, str(group in self.held_out_groups).lower(), figures)

    def _set_accuracy(self, model: str, group: str, held_out: str, figures: Mapping[str, Any]) -> None:
        labels = {"model": model, "group": group, "held_out": held_out}
        self.rm_accuracy.labels(**labels).set(_number(figures.get("accuracy")))
        self.rm_accuracy_pairs.labels(**labels).set(_number(figures.get("num_pairs")))

    def record_ppo(self, metrics: Mapping[str, Any]) -> None:
        """The ppo stage: its last iteration's figures (``trainer.ppo.iteration_stats``)."""
        if "last" not in metrics:
            return
        last = metrics["last"] or {}
        self.ppo_rm_score.set(_number(last.get("rm_score")))
        self.ppo_kl.set(_number(last.get("kl_ref")))
        self.ppo_ptx_loss.set(_number(last.get("ptx_loss")))

    def record_evaluation(self, metrics: Mapping[str, Any]) -> None:
        """The evaluate stage (``trainer.evaluate.evaluate_candidate``)."""
        for gauge, key in ((self.kl_to_sft, "kl_to_sft"), (self.judge_win_rate, "judge_win_rate"),
                           (self.ptx_regression, "ptx_regression")):
            if key in metrics:
                gauge.set(_number(metrics[key]))

    def record_gate(self, metrics: Mapping[str, Any]) -> None:
        """The gate stage (``trainer.gate.GateDecision.to_dict``)."""
        if "promote" not in metrics:
            return
        failed = [name for name, check in metrics.get("checks", {}).items() if not check.get("passed")]
        for name in failed:
            self.gate_check_failures.labels(check=_bounded(name, GATE_CHECKS)).inc()
        decision = "promote" if metrics["promote"] else "reject"
        self.gate_decisions.labels(decision=decision, reason=rejection_reason(failed)).inc()

    # ------------------------------------------------------------------ HTTP

    def serve_http(self, host: str, port: int) -> None:
        """Expose /metrics on host:port (0: do nothing)."""
        if port:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", host, port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def rejection_reason(failed_checks: Iterable[str]) -> str:
    """"passed", or the first failed check in the gate's order (stored metrics come back
    with their keys sorted, so dict order cannot be trusted)."""
    failed = set(failed_checks)
    if not failed:
        return "passed"
    return next((name for name in GATE_CHECKS if name in failed), "other")


def kept_groups(by_group: Mapping[str, Mapping[str, Any]], limit: int, model: str) -> dict[str, Mapping[str, Any]]:
    """At most ``limit`` groups: those with the most measured pairs."""
    if len(by_group) <= limit:
        return dict(by_group)
    ranked = sorted(by_group, key=lambda g: (-(by_group[g].get("num_pairs") or 0), g))
    log.warning("%s accuracy: %d labeler groups, exporting the %d with the most pairs", model, len(by_group), limit)
    return {g: by_group[g] for g in ranked[:limit]}


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


def _number(value: Any) -> float:
    """A metric's value as a float; None (not measured) as NaN."""
    return math.nan if value is None else float(value)
