"""Configuration of the loop: ``TrainerConfig`` (the process) holding ``CycleConfig`` (one
cycle), which nests every stage's config (``HygieneConfig``, ``SFTConfig``, ``RMConfig``,
``PPOConfig``, ``EvalConfig``, ``GateConfig``), beside the store's upkeep (``RetentionConfig``,
``BackupConfig``).

Every field has a help string and is validated at construction. ``load_trainer_config``
reads a TOML or JSON file whose tables mirror the nesting, then applies ``--set`` overrides
with dotted keys::

    # trainer.toml
    schedule = "interval"
    interval_s = 1800
    [cycle.data]
    min_new_prompts = 32
    [cycle.ppo]
    kl_coef = 0.05

    rlhf trainer --config trainer.toml --set cycle.gate.min_win_rate=0.55 --set poll_s=1
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, get_type_hints

from common import paths
from trainer.config import EvalConfig, PPOConfig, RMConfig, SFTConfig, _check, _check_literals, config_from_overrides
from trainer.gate import GateConfig
from trainer.hygiene import HygieneConfig

Schedule = Literal["interval", "cron", "off"]
JudgeRankings = Literal["held_in", "val"]
ADMIN_KEY_ENV = "RLHF_ADMIN_KEY"


@dataclass
class DataConfig:
    """Which data a cycle needs, and which prompts PPO and evaluation use."""

    min_new_prompts: int = field(
        default=16,
        metadata={"help": "Fewest new train-split prompts (logged since the last trained cycle) for PPO; "
                  "fewer ends the cycle as 'skipped'."})
    max_ppo_prompts: int = field(
        default=256, metadata={"help": "PPO uses at most this many new prompts (the newest)."})
    window_s: float | None = field(
        default=None,
        metadata={"help": "Only prompts logged in the last window_s seconds count as new; None = every "
                  "prompt since the last trained cycle."})
    ppo_sources: list[str] = field(
        default_factory=lambda: ["traffic", "import"],
        metadata={"help": "Prompt sources (store `prompts.source`) PPO trains on."})
    min_train_comparisons: int = field(
        default=8, metadata={"help": "Fewest train-split rankings to train the reward model; fewer: 'skipped'."})
    min_val_comparisons: int = field(
        default=4,
        metadata={"help": "Fewest rankings the gate's judge trains on (judge_rankings: 'val' counts the val-split "
                  "ones of prompts the gate does not evaluate on; 'held_in' those and the train split's); "
                  "fewer: 'skipped'."})
    judge_rankings: JudgeRankings = field(
        default="held_in",
        metadata={"help": "What the gate's judge trains on, never the evaluation prompts' rankings nor the "
                  "held-out groups': 'held_in' = every training-group ranking (PPO's RM's train split and the "
                  "other val prompts'), 'val' = the val split's alone, rankings PPO's RM never saw. Replayed on "
                  "seven demo runs (bench.gate_power), the held-in judge agreed with the noise-free rule on "
                  "0.684 of 1,429 answer pairs, the val judge on 0.649; on 16 gate prompts the held-in judge "
                  "made the rule's call on 0.714 of 29 version pairs, the val judge on 8 on 0.554."})
    judge_eval_comparisons: int = field(
        default=64,
        metadata={"help": "judge_rankings='val': the newest train-split rankings (which that judge never sees) "
                  "that also measure its accuracy; scoring them costs one forward pass per completion."})
    min_sft_demonstrations: int = field(
        default=4, metadata={"help": "Fewest train-split demonstrations before SFT runs at all."})
    held_out_groups: list[str] = field(
        default_factory=list,
        metadata={"help": "Labeler groups whose rankings never train a reward model (the paper's held-out "
                  "labelers): they only measure the RM's and the judge's accuracy on unseen people."})
    eval_splits: list[str] = field(
        default_factory=lambda: ["val"],
        metadata={"help": "Splits whose prompts evaluate the candidate (at most eval.max_prompts of them). The "
                  "test split is left out by default: it stays untouched for final evaluation."})

    def __post_init__(self) -> None:
        for name in ("min_new_prompts", "max_ppo_prompts", "min_train_comparisons", "min_val_comparisons",
                     "judge_eval_comparisons", "min_sft_demonstrations"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _check(self.window_s is None or self.window_s > 0, "window_s", "must be > 0 or None", self.window_s)
        _check(self.min_new_prompts <= self.max_ppo_prompts, "min_new_prompts", "must be <= max_ppo_prompts",
               self.min_new_prompts)
        _check(bool(self.ppo_sources), "ppo_sources", "must name a source", self.ppo_sources)
        _check_literals(self)
        _check(bool(self.eval_splits) and set(self.eval_splits) <= {"val", "test"}, "eval_splits",
               "must be a non-empty subset of ['val', 'test'] (never train)", self.eval_splits)


@dataclass
class CycleConfig:
    """One training cycle: data selection and every stage's config."""

    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data needs and selection."})
    hygiene: HygieneConfig = field(default_factory=HygieneConfig, metadata={"help": "Data hygiene."})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "Step 1: SFT."})
    rm: RMConfig = field(default_factory=RMConfig, metadata={"help": "Step 2: the reward model (and the judge)."})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "Step 3: PPO-ptx."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation of the candidate."})
    gate: GateConfig = field(default_factory=GateConfig, metadata={"help": "Promotion bounds."})


@dataclass
class RetentionConfig:
    """How long logged prompts and completions that nothing uses are kept
    (``common.store.ops.retention``: what "used" means)."""

    max_age_days: float | None = field(
        default=None,
        metadata={"help": "Prune prompts and completions logged more than this many days ago that no ranking, "
                  "rating, demonstration or live labeling task uses, and idempotency records as old; None = "
                  "keep everything (deletion cannot be undone: the period is the operator's decision)."})
    keep_splits: list[str] = field(
        default_factory=lambda: ["val", "test"],
        metadata={"help": "Splits whose prompts (and completions) are never pruned: evaluation data (the gate "
                  "evaluates on the oldest val prompts, test is the final evaluation). cycle.data.eval_splits "
                  "are kept whatever this says."})
    every_hours: float = field(
        default=24.0, metadata={"help": "How often the trainer prunes (rlhf store prune: at once)."})
    batch_rows: int = field(
        default=500,
        metadata={"help": "Rows scanned per write transaction: the server's writes wait behind at most one batch."})

    def __post_init__(self) -> None:
        _check(self.max_age_days is None or self.max_age_days > 0, "max_age_days", "must be > 0 or None",
               self.max_age_days)
        _check(set(self.keep_splits) <= {"train", "val", "test"}, "keep_splits",
               "must be a subset of ['train', 'val', 'test']", self.keep_splits)
        _check(self.every_hours > 0, "every_hours", "must be > 0", self.every_hours)
        _check(self.batch_rows >= 1, "batch_rows", "must be >= 1", self.batch_rows)


@dataclass
class BackupConfig:
    """Scheduled online backups of the store (``common.store.backup``)."""

    every_hours: float | None = field(
        default=24.0, metadata={"help": "Hours between backups; None = no scheduled backups (rlhf store backup "
                                "still works)."})
    keep: int = field(default=7, metadata={"help": "The newest `keep` verified backups stay; older ones go."})
    folder: Path = field(
        default_factory=lambda: paths.data_dir() / "backups",
        metadata={"help": "Where backups go: <store stem>-<UTC time>.sqlite, each integrity-checked, fsynced "
                  "and renamed into place."})

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        _check(self.every_hours is None or self.every_hours > 0, "every_hours", "must be > 0 or None",
               self.every_hours)
        _check(self.keep >= 1, "keep", "must be >= 1", self.keep)


@dataclass
class TrainerConfig:
    """The trainer process (`rlhf trainer`): where things live, when cycles run, how it swaps."""

    store_path: Path = field(
        default_factory=lambda: paths.data_dir() / "rlhf.sqlite", metadata={"help": "The SQLite store."})
    checkpoints_root: Path = field(
        default_factory=lambda: paths.data_dir() / "checkpoints",
        metadata={"help": "Folder of published checkpoints vN/ (shared with the server)."})
    work_dir: Path = field(
        default_factory=lambda: paths.data_dir() / "trainer",
        metadata={"help": "Scratch space: one folder per running cycle (snapshot, stage outputs)."})
    server_address: str | None = field(
        default="127.0.0.1:50051",
        metadata={"help": "host:port of the server's Admin service; None = no server: the trainer marks the "
                  "promoted version serving in the store itself."})
    admin_key: str | None = field(
        default=None,
        metadata={"help": f"Admin API key for Admin.SwapPolicy; None = ${ADMIN_KEY_ENV}, or no key (a keyless "
                  "store on loopback)."})
    swap_timeout_s: float = field(default=300.0, metadata={"help": "Deadline of the SwapPolicy call."})
    schedule: Schedule = field(
        default="interval", metadata={"help": "'interval' every interval_s, 'cron' by `cron`, 'off': triggers only."})
    interval_s: float = field(default=3600.0, metadata={"help": "Seconds between scheduled cycles."})
    cron: str = field(default="0 * * * *", metadata={"help": "Crontab expression (schedule='cron')."})
    poll_s: float = field(
        default=2.0, metadata={"help": "How often the store is polled for queued cycles (triggers)."})
    heartbeat_s: float = field(default=5.0, metadata={"help": "How often a running cycle stamps its heartbeat."})
    stale_after_s: float = field(
        default=120.0,
        metadata={"help": "A running cycle without a heartbeat for this long is marked failed (its trainer "
                  "died); one whose trainer pid is gone on this host is failed at once."})
    keep_last: int = field(
        default=3,
        metadata={"help": "Retention: the newest keep_last checkpoints stay, plus (always) v0, the serving, "
                  "the previous serving and their SFT references."})
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads for the process; None = torch's choice."})
    share_cpu: bool = field(
        default=True,
        metadata={"help": "Before each training stage, epoch and PPO iteration, use as many torch threads as "
                  "cores the other processes (the serving engine) left idle over the last seconds: at least 1, "
                  "at most torch_threads or all cores (trainer.device.ThreadsBesideNeighbours; Linux). A stage's "
                  "own num_threads wins."})
    keep_work_dirs: bool = field(
        default=False, metadata={"help": "Keep a finished cycle's scratch folder (debugging)."})
    metrics_port: int = field(
        default=0, metadata={"help": "Prometheus /metrics HTTP port of the trainer (trainer.metrics); 0 = off."})
    metrics_host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address /metrics binds: loopback by default (no authentication); 0.0.0.0 lets other "
                  "machines scrape it."})
    trunk_cache_mb: float = field(
        default=1024.0,
        metadata={"help": "Memory for the reward models' frozen-trunk outputs kept across cycles "
                  "(trainer.trunk_cache; top_layers mode with cache_trunk): a cycle then runs only its NEW "
                  "completions through the frozen layers. Least recently used rows go first; 0 = keep none."})
    cycle: CycleConfig = field(default_factory=CycleConfig, metadata={"help": "One cycle."})
    retention: RetentionConfig = field(
        default_factory=RetentionConfig, metadata={"help": "Pruning old logged data nothing uses."})
    backup: BackupConfig = field(default_factory=BackupConfig, metadata={"help": "Scheduled store backups."})

    def __post_init__(self) -> None:
        self.store_path, self.checkpoints_root, self.work_dir = (
            Path(self.store_path), Path(self.checkpoints_root), Path(self.work_dir))
        if self.server_address == "":
            self.server_address = None
        for name in ("swap_timeout_s", "interval_s", "poll_s", "heartbeat_s"):
            _check(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        _check(self.stale_after_s > 2 * self.heartbeat_s, "stale_after_s", "must exceed 2 * heartbeat_s",
               self.stale_after_s)
        _check(self.schedule in ("interval", "cron", "off"), "schedule", "must be interval | cron | off",
               self.schedule)
        _check(self.keep_last >= 1, "keep_last", "must be >= 1", self.keep_last)
        _check(self.trunk_cache_mb >= 0, "trunk_cache_mb", "must be >= 0", self.trunk_cache_mb)
        _check(0 <= self.metrics_port <= 65535, "metrics_port", "must lie in 0..65535", self.metrics_port)
        _check(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be >= 1 or None",
               self.torch_threads)
        if self.schedule == "cron":
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(self.cron)  # raises ValueError on a bad expression

    def resolved_admin_key(self) -> str | None:
        return self.admin_key or os.environ.get(ADMIN_KEY_ENV) or None


# ---------------------------------------------------------------------------- loading


def load_trainer_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> TrainerConfig:
    """``TrainerConfig`` from a TOML/JSON file (tables = nesting) and dotted ``key=value`` overrides."""
    values = read_config_file(Path(path)) if path is not None else {}
    return build_config(TrainerConfig, values, overrides)


def load_trainer_config_for_cli(path: Path | str | None, overrides: Sequence[str], command: str
                                ) -> TrainerConfig | None:
    """``load_trainer_config`` for a command line (`rlhf <command>`): a bad file or override
    prints why and gives None (the command then exits with status 2)."""
    try:
        return load_trainer_config(path, overrides)
    except (ValueError, OSError) as exc:
        print(f"rlhf {command}: bad config: {exc}", file=sys.stderr)
        return None


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a .toml or .json config file."""
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    raise ValueError(f"Unknown config file type: {path.suffix!r} (expected .toml or .json)")


def build_config(cls: type, values: Mapping[str, Any], overrides: Sequence[str] = ()) -> Any:
    """Build the dataclass ``cls`` from nested ``values`` and ``a.b.c=value`` overrides.

    Nested dataclass fields recurse; the rest go through ``trainer.config.config_from_overrides``,
    which types each value by its field (so file values and overrides validate alike).
    """
    hints = get_type_hints(cls)
    nested = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    unknown = [k for k in values if isinstance(values[k], Mapping) and k not in nested]
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} section: {unknown[0]} (sections: {', '.join(sorted(nested))})")
    children = {}
    for name in nested:
        prefix = f"{name}."
        inner = [o[len(prefix):] for o in overrides if o.startswith(prefix)]
        children[name] = build_config(hints[name], values.get(name, {}), inner)
    flat = [f"{k}={_as_text(v)}" for k, v in values.items() if k not in nested]
    flat += [o for o in overrides if o.partition("=")[0].strip().split(".")[0] not in nested]
    return dataclasses.replace(config_from_overrides(cls, flat), **children)


def _as_text(value: Any) -> str:
    """A file value as override text: strings verbatim, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready nested dict of a config (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
