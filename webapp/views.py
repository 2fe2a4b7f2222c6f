"""What the templates show, made from the protos: plain strings and rows, so the
templates hold no logic beyond loops (an unset optional field shows as "—")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.v1 import admin_pb2, feedback_pb2
from webapp.forms import FLAG_SHORT, RATING_FLAGS, flag_label

DASH = "—"
LONG_CHARS = 700  # longer completions start collapsed (the page's script adds the toggle)
LONG_LINES = 14
# Ouyang et al. 2022, section 5.3 / appendix B.5: agreement among labelers on shared items.
PAPER_AGREEMENT = (
    ("InstructGPT training labelers, with each other", "72.6 ± 1.5%"),
    ("InstructGPT held-out labelers, with each other", "77.3 ± 1.3%"),
)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def optional(message: Any, name: str, fmt: Any = str) -> str:
    """A proto3 `optional` field formatted, or "—" when unset."""
    return fmt(getattr(message, name)) if message.HasField(name) else DASH


@dataclass
class CompletionView:
    id: str
    number: int
    text: str
    policy_version: int
    long: bool
    rank: str = ""
    overall: str = ""
    flags: set[str] = field(default_factory=set)


def completion_views(task: feedback_pb2.ComparisonTask, kept: dict[str, Any] | None = None) -> list[CompletionView]:
    """The task's completions numbered 1..K, with the values a re-rendered form keeps."""
    kept = kept or {}
    views = []
    for number, c in enumerate(task.completions, start=1):
        text = c.text
        views.append(CompletionView(
            id=c.completion_id, number=number, text=text, policy_version=c.policy_version,
            long=len(text) > LONG_CHARS or text.count("\n") >= LONG_LINES,
            rank=kept.get("ranks", {}).get(c.completion_id, ""),
            overall=kept.get("overall", {}).get(c.completion_id, ""),
            flags=set(kept.get("flags", {}).get(c.completion_id, [])),
        ))  # fmt: skip
    return views


def progress_view(progress: feedback_pb2.Progress | None) -> dict[str, Any] | None:
    if progress is None:
        return None
    return {
        "user_id": progress.user_id, "role": progress.role, "group": progress.labeler_group or DASH,
        "ranked": progress.ranked_today, "declined": progress.declined_today,
        "demonstrations": progress.demonstrations_today, "ratings": progress.ratings_today,
        "waiting": progress.queue_waiting,
    }  # fmt: skip


def labeler_rows(quality: admin_pb2.LabelerQuality) -> list[dict[str, str]]:
    seconds = lambda s: f"{s:.1f} s"  # noqa: E731
    return [{
        "labeler": s.labeler_id, "group": s.labeler_group or DASH,
        "done": str(s.tasks_done), "declined": str(s.tasks_declined),
        "median_time": optional(s, "median_seconds_per_task", seconds),
        "shared": str(s.shared_tasks), "agreement": optional(s, "pairwise_agreement", percent),
        "gold": str(s.gold_tasks), "gold_agreement": optional(s, "gold_agreement", percent),
        "flagged": "yes" if s.flagged else "no", "reason": s.flag_reason or "",
    } for s in quality.labelers]  # fmt: skip


def group_row(group: admin_pb2.GroupAgreement, name: str | None = None) -> dict[str, str]:
    return {
        "group": name if name is not None else (group.labeler_group or "(no group)"),
        "labelers": str(group.labelers), "shared": str(group.shared_tasks), "pairs": str(group.pairs),
        "agreement": optional(group, "pairwise_agreement", percent),
        "alpha": optional(group, "krippendorff_alpha", lambda a: f"{a:.3f}"),
    }  # fmt: skip


def quality_view(quality: admin_pb2.LabelerQuality) -> dict[str, Any]:
    return {
        "labelers": labeler_rows(quality),
        "groups": [group_row(g) for g in quality.groups] + [group_row(quality.overall, "all labelers")],
        "settings": [("share of tasks given to two or more labelers", percent(quality.overlap_share)),
                     ("share of tasks that are gold tasks", percent(quality.gold_share)),
                     ("a labeler is flagged below this gold agreement", percent(quality.gold_min_agreement)),
                     ("... over at least this many gold tasks", str(quality.gold_min_tasks))],
        "paper": PAPER_AGREEMENT,
    }  # fmt: skip


def ratings_view(report: admin_pb2.RatingsReport) -> dict[str, Any]:
    """One row per policy version: ratings, mean Likert and the share of each flag (Fig. 4)."""
    rows = [{
        "version": f"v{v.policy_version}", "ratings": str(v.ratings),
        "mean": f"{v.mean_overall:.2f}" if v.ratings else DASH,
        "flags": [percent(v.flag_share[name]) if name in v.flag_share and v.ratings else DASH for name in RATING_FLAGS],
    } for v in report.versions]  # fmt: skip
    return {"flags": [(FLAG_SHORT.get(name, name), flag_label(name)) for name in RATING_FLAGS], "rows": rows}


def stats_view(stats: admin_pb2.Stats) -> dict[str, Any]:
    counts = [(name, str(getattr(stats, name))) for name in
              ("users", "prompts", "completions", "rankings", "demonstrations", "ratings", "policies", "cycles")]
    splits = ", ".join(f"{split} {n}" for split, n in sorted(stats.prompts_by_split.items())) or DASH
    return {"serving": f"v{stats.serving_version}", "counts": counts, "splits": splits}
