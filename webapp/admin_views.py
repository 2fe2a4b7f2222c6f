"""What the cycles and policies pages show, made from Admin.ListCycles / GetCycle /
ListPolicies: plain strings, rows and charts, so the templates hold no logic beyond loops.

A cycle's `metrics_json` is the trainer's own record, keyed by stage (snapshot, hygiene,
sft, rm, ppo, evaluate, gate, publish, swap, record), and its shape changes with the
trainer: every figure is read defensively, and one that is missing, not a number or
not finite shows as "—". The columns are those of the demo's per-cycle table
(scripts/demo.py, COLUMNS) that the store records; the demo's comparisons against v0 on
its fixed test prompts (win_B, p_B, win_rule, ...) are the demo's own measurement and
live in its report.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.v1 import admin_pb2, common_pb2
from webapp.plots import Chart, line_chart
from webapp.views import DASH

# The trainer's stages in the order a cycle runs them (trainer/cycle.py, cycle_recipe).
STAGES = ("snapshot", "hygiene", "sft", "rm", "ppo", "evaluate", "gate", "publish", "swap", "record")


@dataclass(frozen=True)
class Column:
    """A figure of the per-cycle table: its name (the demo's), what it is, where it lives
    in the cycle's metrics."""

    name: str
    meaning: str
    path: tuple[str, ...]


# (the per-group RM accuracy columns, rm_acc_<group>, are added for the groups the cycles name)
CYCLE_COLUMNS = [
    Column("rm_pairs", "pairwise comparisons PPO's RM trained on (the training labelers' train-split rankings)",
           ("rm", "rm", "num_train_pairs")),
    Column("rm_acc", "PPO's RM: pairwise accuracy on rankings it never trained on (val split, held-out groups)",
           ("rm", "rm", "val", "accuracy")),
    Column("judge_acc", "the gate's judge: pairwise accuracy on rankings it never trained on",
           ("rm", "judge", "val", "accuracy")),
    Column("gate_win", "the candidate vs the serving policy on the evaluation prompts, judged by the gate's judge "
           "(ties count half)", ("evaluate", "judge_win_rate")),
    Column("p_gate", "one-sided binomial test of the judge's wins > 0.5", ("evaluate", "p_value")),
    Column("rm_score", "mean RM score of the candidate's samples on the evaluation prompts",
           ("evaluate", "rm_score_candidate")),
    Column("kl", "KL(candidate || SFT), nats per token, on the candidate's own samples", ("evaluate", "kl_to_sft")),
    Column("ptx", "the candidate's NLL on held-out pretraining text (nats/token)", ("evaluate", "ptx_nll_candidate")),
    Column("ptx_reg", "ptx NLL minus the serving policy's (the alignment tax)", ("evaluate", "ptx_regression")),
    Column("words", "mean words per answer of the candidate on the evaluation prompts",
           ("evaluate", "mean_words_candidate")),
    Column("stall", "swap stall (s): new requests held while the promoted candidate loaded",
           ("swap", "stall_seconds")),
]  # fmt: skip
SECONDS_MEANING = "wall time of the cycle, from its trigger to its end (swap included)"
POLICY_FIGURES = (  # (header, what it is, key in the policy's metrics_json)
    ("judge win", "the gate's judge: this version vs the one serving when it was evaluated", "judge_win_rate"),
    ("KL to SFT", "nats per token, on its own samples", "kl_to_sft"),
    ("ptx regression", "held-out pretraining NLL minus the serving policy's (the alignment tax)", "ptx_regression"),
)


# ---------------------------------------------------------------- reading figures


def read_metrics(text: str) -> dict[str, Any]:
    """A metrics_json object, or {} when it is empty, not JSON or not an object."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def dig(metrics: Mapping[str, Any], path: Sequence[str]) -> Any:
    """The value at `path` in nested metrics, or None when a step is missing or not an object."""
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def figure(metrics: Mapping[str, Any], path: Sequence[str]) -> float | None:
    """The number at `path` in nested metrics, or None when a step is missing or the value
    is not a finite number (booleans are not figures)."""
    value = dig(metrics, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def cell(value: float | None) -> str:
    """A figure as the demo's table prints it (scripts/demo.py, `_cell`); "—" when missing."""
    if value is None:
        return DASH
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 0.01 and value else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def when(ts: Timestamp, present: bool = True, fmt: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    if not present or (ts.seconds == 0 and ts.nanos == 0):
        return DASH
    return datetime.fromtimestamp(ts.seconds, timezone.utc).strftime(fmt)


SHORT = "%Y-%m-%d %H:%M"  # the tables' times (UTC, said in the header); a cycle's own page has the seconds


def _seconds(ts: Timestamp, present: bool) -> float | None:
    return ts.ToNanoseconds() / 1e9 if present and (ts.seconds or ts.nanos) else None


def state_name(state: int) -> str:
    return admin_pb2.CycleState.Name(state).removeprefix("CYCLE_STATE_").lower()


def status_name(status: int) -> str:
    return common_pb2.PolicyStatus.Name(status).removeprefix("POLICY_STATUS_").lower()


# ---------------------------------------------------------------- cycles


def groups_in(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The labeler groups PPO's RM was measured on, over all cycles."""
    names: set[str] = set()
    for m in metrics:
        by_group = dig(m, ("rm", "rm", "val", "by_group"))
        if isinstance(by_group, Mapping):
            names.update(str(g) for g in by_group)
    return sorted(names)


def cycle_columns(groups: Sequence[str]) -> list[Column]:
    """The table's figure columns: the fixed ones, with RM accuracy per labeler group after rm_acc."""
    per_group = [Column(f"rm_acc_{g}", f"PPO's RM: pairwise accuracy on group {g}'s rankings it never trained on",
                        ("rm", "rm", "val", "by_group", g, "accuracy")) for g in groups]  # fmt: skip
    return CYCLE_COLUMNS[:2] + per_group + CYCLE_COLUMNS[2:]


def stages_in(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The stages with a recorded time: the trainer's order, then any others by name."""
    seen = {name for m in metrics for name, value in m.items() if isinstance(value, Mapping) and "seconds" in value}
    return [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))


def cycle_row(cycle: admin_pb2.Cycle, metrics: Mapping[str, Any], columns: Sequence[Column],
              stages: Sequence[str], fmt: str = SHORT) -> dict[str, Any]:  # fmt: skip
    created = _seconds(cycle.created_at, cycle.HasField("created_at"))
    finished = _seconds(cycle.finished_at, cycle.HasField("finished_at"))
    return {
        "id": cycle.cycle_id, "state": state_name(cycle.state), "stage": cycle.stage or DASH,
        "trigger": cycle.trigger or DASH,
        "created": when(cycle.created_at, cycle.HasField("created_at"), fmt),
        "started": when(cycle.started_at, cycle.HasField("started_at"), fmt),
        "finished": when(cycle.finished_at, cycle.HasField("finished_at"), fmt),
        "base": f"v{cycle.base_version}" if cycle.base_version >= 0 else DASH,
        "candidate": f"v{cycle.candidate_version}" if cycle.HasField("candidate_version") else DASH,
        "figures": [cell(figure(metrics, c.path)) for c in columns],
        "seconds": cell(finished - created if created is not None and finished is not None else None),
        "stage_seconds": [cell(figure(metrics, (s, "seconds"))) for s in stages],
        "error": cycle.error,
    }  # fmt: skip


def cycles_view(cycles: Sequence[admin_pb2.Cycle]) -> dict[str, Any]:
    """The cycles page: the table (newest first, as listed), stage times and the charts."""
    metrics = [read_metrics(c.metrics_json) for c in cycles]
    groups = groups_in(metrics)
    columns, stages = cycle_columns(groups), stages_in(metrics)
    rows = [cycle_row(c, m, columns, stages) for c, m in zip(cycles, metrics)]
    return {
        "rows": rows, "columns": columns, "stages": stages, "seconds_meaning": SECONDS_MEANING,
        "charts": cycle_charts([c.cycle_id for c in cycles], metrics, groups),
    }  # fmt: skip


def cycle_charts(ids: Sequence[int], metrics: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> list[Chart]:
    """The demo's three panels, from what the store records: the gate's verdict, the reward
    models' accuracy, drift and the alignment tax; oldest cycle on the left. The third
    plots the ptx regression (candidate minus serving) where the demo plots the ptx NLL
    itself: on one axis with a KL of ~0.01, an NLL of ~3 flattens the KL to a line."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    xs = [ids[i] for i in order]

    def series(path: Sequence[str]) -> list[float | None]:
        return [figure(metrics[i], path) for i in order]

    accuracy = {f"PPO's RM, group {g}": series(("rm", "rm", "val", "by_group", g, "accuracy")) for g in groups}
    accuracy = accuracy or {"PPO's RM": series(("rm", "rm", "val", "accuracy"))}
    accuracy["the gate's judge"] = series(("rm", "judge", "val", "accuracy"))
    return [
        line_chart("The gate: candidate vs serving", "cycle", "win rate", xs, {
            "judge (the gate)": series(("evaluate", "judge_win_rate")),
            "PPO's RM": series(("evaluate", "rm_win_rate"))}, y_floor=(0.0, 1.0), guides={"even": 0.5}),
        line_chart("Reward-model accuracy (unseen rankings)", "cycle", "pairwise accuracy", xs, accuracy,
                   y_floor=(0.3, 1.0), guides={"chance": 0.5}),
        line_chart("Drift and the alignment tax", "cycle", "nats per token", xs, {
            "KL to SFT": series(("evaluate", "kl_to_sft")),
            "ptx regression": series(("evaluate", "ptx_regression"))}),
    ]  # fmt: skip


def cycle_detail(cycle: admin_pb2.Cycle) -> dict[str, Any]:
    """One cycle: its fields and each stage's metrics as indented JSON (shown as text)."""
    metrics = read_metrics(cycle.metrics_json)
    stages = [s for s in STAGES if s in metrics] + sorted(set(metrics) - set(STAGES))
    row = cycle_row(cycle, metrics, [], [], fmt="%Y-%m-%d %H:%M:%S UTC")
    return {**row, "stages": [(s, json.dumps(metrics[s], indent=2, sort_keys=True, default=str)) for s in stages]}


# ---------------------------------------------------------------- policies


def policy_row(policy: common_pb2.Policy) -> dict[str, Any]:
    metrics = read_metrics(policy.metrics_json)
    kind = metrics.get("kind")
    return {
        "version": policy.version, "name": f"v{policy.version}", "status": status_name(policy.status),
        "parent": f"v{policy.parent_version}" if policy.HasField("parent_version") else DASH,
        "cycle": str(policy.cycle_id) if policy.HasField("cycle_id") else DASH,
        "created": when(policy.created_at, policy.HasField("created_at"), SHORT),
        "kind": kind if isinstance(kind, str) and kind else DASH,
        "figures": [cell(figure(metrics, (key,))) for _, _, key in POLICY_FIGURES],
        "path": policy.path,
    }  # fmt: skip


def policies_view(policies: Sequence[common_pb2.Policy]) -> dict[str, Any]:
    """The policies page: every version (newest first), the serving one, the ones that
    served before (retired: Rollback returns to the one whose serving ended last)."""
    rows = [policy_row(p) for p in policies]
    serving = next((r for r in rows if r["status"] == "serving"), None)
    # Rollback's default, as the server picks it: the non-serving policy that started serving last.
    served = [p for p in policies if p.HasField("serving_since") and status_name(p.status) != "serving"]
    latest = max(served, key=lambda p: p.serving_since.ToNanoseconds(), default=None)
    return {
        "rows": rows, "serving": serving, "served_before": [r for r in rows if r["status"] == "retired"],
        "rollback_to": None if latest is None else f"v{latest.version}",
        "figures": [(header, meaning) for header, meaning, _ in POLICY_FIGURES],
    }  # fmt: skip


def swap_view(answer: admin_pb2.SwapPolicyResponse) -> dict[str, Any]:
    """A swap's figures (SwapPolicyResponse), as the result page lists them."""
    changed = answer.version != answer.previous_version
    return {
        "changed": changed, "version": f"v{answer.version}", "previous": f"v{answer.previous_version}",
        "figures": [
            ("stall", f"{answer.stall_seconds:.3f} s", "new requests could not start while the engine drained and "
                                                      "reloaded"),
            ("total", f"{answer.total_seconds:.3f} s", "from the call until the new version served"),
            ("swap mode", answer.swap_mode or DASH, "drain: in-flight requests finished on the old weights first; "
                                                   "keep: they continued on the new ones"),
            ("continued requests", str(answer.continued_requests),
             "requests in flight across the reload that continued on the new weights (recorded with both versions)"),
        ],
    }  # fmt: skip
