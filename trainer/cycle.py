"""One training cycle of the loop, as a recipe (``cycle_recipe``) that reads top to bottom:

  snapshot   a consistent copy of the store (``Store.snapshot``); the serving policy and
             the watermark of the last trained cycle come from it
  hygiene    ``trainer.hygiene.run_hygiene`` on its prompts, then records by split
             (``trainer.snapshot_data``); too little new data ends the cycle as "skipped"
  sft        only when the demonstrations changed since the lineage's SFT: SFT from the
             base v0, published as a checkpoint: it starts a new LINEAGE (its own KL
             reference, PPO starts from it); otherwise PPO starts from the SERVING policy
             and the reference stays the SFT model of the serving lineage
  rm         the reward model on ALL train-split rankings (val-split ones measure it, per
             labeler group), and the gate's JUDGE, a second RM trained apart on the training
             groups' rankings of every prompt but the evaluation prompts (``judge_split``;
             ``data.judge_rankings = "val"``: the val split's alone, data PPO's RM never saw).
             Rankings of the held-out labeler groups (``data.held_out_groups``) train
             neither; they measure both
  ppo        PPO-ptx on the train-split prompts logged since the last trained cycle
  evaluate   candidate vs serving on the evaluation prompts, judged by the judge
             (``trainer.evaluate.evaluate_candidate``); the KL to SFT on the candidate's samples
  gate       promote only within the bounds of ``GateConfig`` (the judge's own accuracy on
             rankings it never saw among them); else "rejected"
  publish    ``common.checkpoints.write_checkpoint`` (write aside, fsync, rename, hashes),
             with PPO's LoRA adapters and their base (the SFT reference) in the manifest when
             it trained them on that reference; then the store's policies table (candidate)
  swap       ``Admin.SwapPolicy`` on the running server (or, with no server configured,
             the store alone: ``StoreSwapper``)
  record     retention (``prune_checkpoints``), then the cycle's final state

Under torchrun (``trainer.distributed``) this runs on the coordinator (rank 0); sft, rm and
ppo run data-parallel on every rank (``everywhere``), each rank on its share of the data,
and the coordinator alone writes their outputs. The other stages are the coordinator's.

Every stage writes its name to the cycle row when it starts and its metrics when it ends
(``StageLog``), so `rlhf cycles` and a crash both show where a cycle was. A heartbeat
thread stamps the row while the cycle runs. Crash safety: the cycle starts by cleaning up
after any trainer that died (``trainer.publishing.clean_up_after_crashes``, under the store's one-running-cycle
lock): partial ``*.tmp`` checkpoints, checkpoints published but never recorded, stale
scratch folders. A visible ``vN/`` is always complete (``write_checkpoint``), and the
server keeps serving its version until a swap succeeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checkpoints import ADAPTER_DIR, adapter_record, sha256_file
from common.store import (
    ConflictError,
    Cycle,
    Policy,
    Stats,
    Store,
    get_cycle,
    list_cycles,
    list_policies,
    stats,
    update_cycle,
)
from trainer.gate import decide
from trainer.hygiene import HygieneReport, run_hygiene
from trainer.loop_config import CycleConfig, DataConfig, JudgeRankings, TrainerConfig
from trainer.publishing import (
    Hook,
    PolicySwapper,
    apply_retention,
    clean_up_after_crashes,
    no_hook,
    publish_policy,
    sft_version_of,
    swap_to,
)
from trainer.snapshot_data import CycleData, StoreRows, prompt_records, read_rows, split_cycle_data

if TYPE_CHECKING:
    from trainer.examples import Comparison
    from trainer.metrics import TrainerMetrics
    from trainer.trunk_cache import TrunkCache

log = logging.getLogger(__name__)

TRAINED_STATES = ("promoted", "rejected")  # cycles whose PPO consumed the prompts before their watermark
TRAINING_STAGES = ("sft", "rm", "ppo", "evaluate")  # torch-heavy: their CPU threads are re-decided first


class CycleSkipped(Exception):
    """Too little data for a cycle: it ends as "skipped", nothing trained."""


@dataclass
class CycleContext:
    """What a cycle needs from the process that runs it."""

    store: Store
    config: TrainerConfig
    swapper: PolicySwapper
    hook: Hook = field(default=no_hook)  # called at named points (fault-injection tests)
    # The RMs' frozen-trunk outputs, kept by the trainer process across cycles (None: per training)
    trunk_cache: TrunkCache | None = None
    metrics: TrainerMetrics | None = None  # the process's Prometheus metrics (None: not exported)

    @property
    def cycle_config(self) -> CycleConfig:
        return self.config.cycle


# ---------------------------------------------------------------------------- bookkeeping


class StageLog:
    """``with stages("rm") as metrics:`` records the stage when it starts and its metrics
    (plus wall and CPU seconds) when it ends, also when it raises; and both to ``metrics``."""

    def __init__(self, store: Store, cycle_id: int, hook: Hook, metrics: TrainerMetrics | None = None) -> None:
        self.store, self.cycle_id, self.hook, self.metrics = store, cycle_id, hook, metrics
        self.current: str | None = None

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, Any]]:
        self.current = name
        self.store.write_sync(update_cycle(self.cycle_id, stage=name, heartbeat=True))
        log.info("cycle %d: %s", self.cycle_id, name)
        if self.metrics is not None:
            self.metrics.stage_started(name)
        metrics: dict[str, Any] = {}
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            self.hook(f"stage:{name}")
            if name in TRAINING_STAGES:
                from trainer.device import adapt_threads  # torch: only once a stage trains

                metrics["threads"] = adapt_threads()
            yield metrics
        finally:
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            # CPU seconds of the whole process (all threads): on a shared machine, the
            # figure to budget with (wall time there depends on the neighbours)
            metrics["cpu_seconds"] = round(time.process_time() - cpu_started, 3)
            if self.metrics is not None:
                self.metrics.stage_ended(name, metrics)
            self.store.write_sync(update_cycle(self.cycle_id, stage_metrics={name: _jsonable(metrics)}))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@contextlib.contextmanager
def heartbeat(store: Store, cycle_id: int, every_s: float) -> Iterator[None]:
    """Stamp the cycle's heartbeat every ``every_s`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                store.write_sync(update_cycle(cycle_id, heartbeat=True))
            except Exception:  # noqa: BLE001 - a missed beat must not kill the cycle
                log.warning("cycle %d: heartbeat failed", cycle_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"cycle-{cycle_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------- running a cycle


@dataclass(frozen=True)
class CycleFolders:
    """Where one cycle's stages write, and so where the next stage reads: one name for each
    folder instead of a path string repeated at every stage that touches it."""

    root: Path

    @classmethod
    def of(cls, work_dir: Path, cycle_id: int) -> CycleFolders:
        return cls(Path(work_dir) / f"cycle-{cycle_id}")

    @staticmethod
    def all_in(work_dir: Path) -> list[Path]:
        """Every cycle's scratch root under ``work_dir`` (what a crash may leave behind)."""
        return [d for d in Path(work_dir).glob("cycle-*") if d.is_dir()]

    @property
    def snapshot(self) -> Path:
        """The store copy the cycle reads (a file)."""
        return self.root / "snapshot.sqlite"

    @property
    def sft(self) -> Path:
        """The SFT checkpoint, when demonstrations changed."""
        return self.root / "sft"

    @property
    def rm(self) -> Path:
        """PPO's reward model."""
        return self.root / "rm"

    @property
    def judge(self) -> Path:
        """The gate's judge reward model (never trained on the gate's prompts)."""
        return self.root / "judge"

    @property
    def ppo(self) -> Path:
        """The PPO candidate checkpoint."""
        return self.root / "ppo"

    @property
    def ppo_adapter(self) -> Path:
        """The candidate's LoRA adapters alone, when PPO wrote them (``trainer.ppo.save_policy``)."""
        return self.ppo / ADAPTER_DIR


def run_cycle(cycle: Cycle, ctx: CycleContext) -> Cycle:
    """Run a claimed (running) cycle to its final state and record it; returns the final row.

    Exceptions of a stage end the cycle as "failed" with the error recorded; an interrupt
    (KeyboardInterrupt, SystemExit) is recorded the same way and re-raised.
    """
    work = CycleFolders.of(ctx.config.work_dir, cycle.id)
    stages = StageLog(ctx.store, cycle.id, ctx.hook, ctx.metrics)
    try:
        with heartbeat(ctx.store, cycle.id, ctx.config.heartbeat_s):
            state, note = cycle_recipe(cycle.id, ctx, stages, work)
    except CycleSkipped as skip:
        state, note = "skipped", str(skip)
    except Exception as exc:
        log.exception("cycle %d failed in stage %s", cycle.id, stages.current)
        state, note = "failed", _describe(exc, stages.current)
    except BaseException as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        ctx.store.write_sync(update_cycle(cycle.id, state="failed", error=f"interrupted ({why}) in stage {stages.current}"))
        raise
    finally:
        if not ctx.config.keep_work_dirs:
            shutil.rmtree(work.root, ignore_errors=True)
    log.info("cycle %d: %s%s", cycle.id, state, f" ({note})" if note else "")
    try:
        final = ctx.store.write_sync(update_cycle(cycle.id, state=state, error=note or None))
    except ConflictError:  # marked failed meanwhile (no heartbeat for stale_after_s): that stands
        log.error("cycle %d ended %s, but was already marked failed (heartbeats too late?)", cycle.id, state)
        final = ctx.store.read_sync(get_cycle(cycle.id))
    if ctx.metrics is not None:
        ctx.metrics.cycle_ended(final.state)
    return final


def _describe(exc: BaseException, stage: str | None) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return f"{type(exc).__name__} in stage {stage}{at}: {exc}"


def cycle_recipe(cycle_id: int, ctx: CycleContext, stage: StageLog, work: CycleFolders) -> tuple[str, str]:
    """The cycle, stage by stage; returns (final state, note)."""
    cfg = ctx.cycle_config
    with stage("snapshot") as m:
        stale_scratch = [d for d in CycleFolders.all_in(ctx.config.work_dir) if d != work.root]
        m["cleaned_up"] = clean_up_after_crashes(ctx.store, ctx.config.checkpoints_root, stale_scratch)
        snap = take_snapshot(ctx.store, work.snapshot, cfg.data.window_s)
        ctx.store.write_sync(update_cycle(cycle_id, base_version=snap.serving.version))
        m.update(snap.summary())
    with stage("hygiene") as m:
        data, report = clean_and_split(snap, cfg)
        m.update(hygiene_summary(report), data=data.counts())
        check_enough_data(data, cfg.data)
    with stage("sft") as m:
        lineage, sft_metrics = sft_if_demonstrations_changed(ctx, cycle_id, snap, data, work.sft)
        m.update(sft_metrics, lineage=lineage.summary())
    with stage("rm") as m:
        reward_models = train_reward_models(lineage.reference_dir, data, cfg, work, ctx.trunk_cache)
        m.update(reward_models)
    with stage("ppo") as m:
        m.update(run_ppo(lineage, data, cfg, work))
    with stage("evaluate") as m:
        evaluation = evaluate_against_serving(snap.serving, lineage, data, cfg, work)
        evaluation["judge_accuracy"] = reward_models["judge"]["val"].get("accuracy")
        m.update(evaluation)
    with stage("gate") as m:
        decision = decide(evaluation, cfg.gate)
        m.update(decision.to_dict())
    if not decision.promote:
        return "rejected", decision.reason
    with stage("publish") as m:
        recorded = {"kind": "ppo", "sft_version": lineage.reference_version,
                    **{k: evaluation[k] for k in ("judge_win_rate", "kl_to_sft", "ptx_regression")}}
        candidate = publish_policy(ctx.store, ctx.config.checkpoints_root, cycle_id, work.ppo,
                                   parent=lineage.start_version, metrics=recorded, hook=ctx.hook,
                                   snapshot=snap.manifest_record(), adapter=ppo_adapter_record(lineage, work))
        m.update(version=candidate.version, path=candidate.path)
    with stage("swap") as m:
        m.update(swap_to(ctx.store, ctx.swapper, cycle_id, candidate.version))
    with stage("record") as m:
        m.update(apply_retention(ctx.store, ctx.config.checkpoints_root, ctx.config.keep_last))
    return "promoted", ""


# ---------------------------------------------------------------------------- snapshot and data


@dataclass
class Snapshot:
    """What a cycle read from its store snapshot."""

    rows: StoreRows
    policies: dict[int, Policy]
    serving: Policy
    taken_at: float
    watermark: float  # created_at of the newest prompt in the snapshot: the next cycle's `since`
    since: float  # PPO's new prompts were logged after this
    sha256: str = ""  # of the snapshot file: which store state a checkpoint trained on
    counts: dict[str, Any] = field(default_factory=dict)  # its rows per table (``stats``)

    def policy(self, version: int) -> Policy:
        """A recorded policy whose checkpoint is on disk (the serving lineage needs it)."""
        policy = self.policies.get(version)
        if policy is None or not Path(policy.path).is_dir():
            raise RuntimeError(f"policy v{version} is not in the store or its checkpoint is gone")
        return policy

    def summary(self) -> dict[str, Any]:
        return {"taken_at": self.taken_at, "watermark": self.watermark, "since": self.since,
                "serving_version": self.serving.version, "prompts": len(self.rows.prompts),
                "rankings": len(self.rows.rankings), "demonstrations": len(self.rows.demonstrations),
                "opted_out_users": len(self.rows.opted_out),  # their data was left out (read_rows)
                "sha256": self.sha256}

    def manifest_record(self) -> dict[str, Any]:
        """What a published checkpoint's manifest says about the data it trained on."""
        return {"sha256": self.sha256, "taken_at": self.taken_at, "watermark": self.watermark,
                "since": self.since, "counts": dict(self.counts)}


def take_snapshot(store: Store, copy_to: Path, window_s: float | None) -> Snapshot:
    """Copy the store to ``copy_to``, read the rows a cycle trains on, find the serving policy
    and `since`."""
    copy_to.parent.mkdir(parents=True, exist_ok=True)
    path = store.snapshot(copy_to)
    taken_at = time.time()
    sha256 = sha256_file(path)
    with Store.open_readonly(path) as snap:
        counts = snapshot_counts(snap.read_sync(stats()))
        rows = snap.read_sync(read_rows)
        policies = {p.version: p for p in snap.read_sync(list_policies())}
        trained = [c for c in snap.read_sync(list_cycles(limit=0)) if c.state in TRAINED_STATES]
    serving = next((p for p in policies.values() if p.status == "serving"), None)
    if serving is None:
        raise RuntimeError("no serving policy in the store: start the server once (it publishes v0)")
    since = max((c.metrics.get("snapshot", {}).get("watermark", 0.0) for c in trained), default=0.0)
    if window_s is not None:
        since = max(since, taken_at - window_s)
    watermark = max((p.created_at for p in rows.prompts), default=since)
    return Snapshot(rows, policies, serving, taken_at, watermark, since, sha256, counts)


def snapshot_counts(row_counts: Stats) -> dict[str, Any]:
    """Rows per table and prompts per split of a snapshot (a checkpoint's manifest records them)."""
    return {k: v for k, v in dataclasses.asdict(row_counts).items() if k != "serving_version"}


def clean_and_split(snap: Snapshot, cfg: CycleConfig) -> tuple[CycleData, HygieneReport]:
    """Hygiene on every prompt of the snapshot, then the kept rows as records by split."""
    kept, report = run_hygiene(prompt_records(snap.rows.prompts), cfg.hygiene)
    data = split_cycle_data(
        snap.rows, kept, since=snap.since, until=snap.watermark, max_ppo_prompts=cfg.data.max_ppo_prompts,
        ppo_sources=cfg.data.ppo_sources, eval_splits=cfg.data.eval_splits, max_eval_prompts=cfg.eval.max_prompts,
        held_out_groups=cfg.data.held_out_groups)
    return data, report


def hygiene_summary(report: HygieneReport) -> dict[str, Any]:
    """The report without per-prompt lists (ids of PII prompts stay out of the metrics)."""
    summary = report.to_dict()
    summary["split_disagreements"] = len(report.split_disagreements)
    summary["pii_prompts"] = len(summary.pop("pii_prompt_ids"))
    return summary


def check_enough_data(data: CycleData, need: DataConfig) -> None:
    """Raise CycleSkipped naming every shortfall."""
    counts = data.counts()
    # The judge never trains on the rankings of the prompts the gate evaluates on.
    counts["judge_comparisons"] = len(judge_split(data, need.judge_eval_comparisons, need.judge_rankings)[0])
    wanted = {"ppo_prompts": need.min_new_prompts, "comparisons_train": need.min_train_comparisons,
              "judge_comparisons": need.min_val_comparisons, "eval_prompts": 1}
    short = [f"{name} {counts[name]} < {least}" for name, least in wanted.items() if counts[name] < least]
    if short:
        raise CycleSkipped("too little new data: " + ", ".join(short))


# ---------------------------------------------------------------------------- lineage and SFT


@dataclass
class Lineage:
    """Where PPO starts and what it is held to: the SFT reference of the start policy."""

    start_version: int
    start_dir: Path
    reference_version: int
    reference_dir: Path

    def summary(self) -> dict[str, Any]:
        return {"start_version": self.start_version, "reference_version": self.reference_version}

    @classmethod
    def of(cls, start: Policy, reference: Policy) -> Lineage:
        return cls(start.version, Path(start.path), reference.version, Path(reference.path))


def sft_if_demonstrations_changed(
    ctx: CycleContext, cycle_id: int, snap: Snapshot, data: CycleData, out_dir: Path
) -> tuple[Lineage, dict[str, Any]]:
    """The serving lineage, an earlier SFT on the same demonstrations, or a fresh SFT."""
    serving = snap.serving
    current = Lineage.of(serving, snap.policy(sft_version_of(serving)))
    train, val = data.demonstrations["train"], data.demonstrations["val"]
    if len(train) < ctx.cycle_config.data.min_sft_demonstrations:
        return current, {"ran": False, "reason": f"{len(train)} train demonstrations"}
    same = [p for p in snap.policies.values() if p.metrics.get("kind") == "sft"
            and p.metrics.get("demonstrations_sha256") == data.demonstrations_sha256 and Path(p.path).is_dir()]
    if same:
        newest = max(same, key=lambda p: p.version)
        lineage = current if newest.version == current.reference_version else Lineage.of(newest, newest)
        return lineage, {"ran": False, "reason": f"demonstrations unchanged since SFT v{newest.version}"}
    from trainer.distributed import everywhere
    from trainer.sft import train_sft

    result = everywhere(train_sft, snap.policy(0).path, train, val, ctx.cycle_config.sft, out_dir)
    sft = publish_policy(ctx.store, ctx.config.checkpoints_root, cycle_id, out_dir, parent=0, hook=ctx.hook, metrics={
        "kind": "sft", "demonstrations_sha256": data.demonstrations_sha256, "best_epoch": result.best_epoch},
        snapshot=snap.manifest_record())
    return Lineage.of(sft, sft), {"ran": True, "version": sft.version, "result": result.to_dict()}


# ---------------------------------------------------------------------------- training stages


def train_reward_models(reference_dir: Path, data: CycleData, cfg: CycleConfig, work: CycleFolders,
                        trunk_cache: TrunkCache | None = None) -> dict[str, Any]:
    """PPO's RM on the train-split rankings (measured on val), and the gate's JUDGE on the
    training groups' rankings of prompts the gate does NOT evaluate on (``judge_split``,
    ``data.judge_rankings``), measured on rankings it never saw: those of the evaluation
    prompts and the held-out labelers'. Both are measured per labeler group (and per sampling
    policy version); both read the frozen trunk's outputs from ``trunk_cache`` (same SFT model)."""
    from trainer.distributed import everywhere
    from trainer.rm_training import train_reward_model

    demos = data.demonstrations["train"] or None
    own = {"trunk_cache": trunk_cache}  # each rank keeps its own cache
    rm_train, rm_unseen = rm_split(data)
    rm = everywhere(train_reward_model, reference_dir, rm_train, rm_unseen, cfg.rm, work.rm, demonstrations=demos,
                    local=own)
    judge_train, judge_unseen = judge_split(data, cfg.data.judge_eval_comparisons, cfg.data.judge_rankings)
    judge = everywhere(train_reward_model, reference_dir, judge_train, judge_unseen, cfg.rm, work.judge,
                       demonstrations=demos, local=own)
    return {"rm": rm.to_dict(), "judge": judge.to_dict()}


def rm_split(data: CycleData) -> tuple[list[Comparison], list[Comparison]]:
    """(what PPO's RM trains on, what measures it): the training groups' train-split rankings;
    their val-split ones and the held-out labelers'."""
    return data.comparisons["train"], data.comparisons["val"] + data.held_out_comparisons


def judge_split(data: CycleData, train_split_sample: int, rankings: JudgeRankings
                ) -> tuple[list[Comparison], list[Comparison]]:
    """(what the judge trains on, what measures it). It never trains on the rankings of the
    prompts the gate evaluates on (they measure it) nor on the held-out labelers' (they
    measure it too). ``rankings`` "val": the val-split rankings of the other prompts train
    it, and the newest ``train_split_sample`` train-split ones measure it as well; "held_in":
    the train split's train it too (PPO's RM's data and more: a different model on more
    data, which replayed demo runs found the better judge, docs/BENCHMARKS.md)."""
    evaluated = {p.prompt_id for p in data.eval_prompts}
    val = data.comparisons["val"]
    val_rest = [c for c in val if c.prompt_id not in evaluated]
    unseen = [c for c in val if c.prompt_id in evaluated]
    if rankings == "held_in":
        return data.comparisons["train"] + val_rest, unseen + data.held_out_comparisons
    return val_rest, unseen + data.comparisons["train"][-train_split_sample:] + data.held_out_comparisons


def pretraining_texts(cfg: CycleConfig) -> tuple[list[str], list[str]]:
    """(train, held-out) paragraphs of the shipped corpus, split as PPO splits it by default."""
    from trainer.corpus import load_corpus, split_corpus

    return split_corpus(load_corpus(), cfg.ppo.ptx_held_out_fraction, seed=0)


def run_ppo(lineage: Lineage, data: CycleData, cfg: CycleConfig, work: CycleFolders) -> dict[str, Any]:
    """PPO-ptx from the lineage's start policy against the cycle's RM."""
    from trainer.distributed import everywhere
    from trainer.ppo import train_ppo

    ptx_train, _ = pretraining_texts(cfg)
    result = everywhere(train_ppo, lineage.start_dir, lineage.reference_dir, work.rm, data.ppo_prompts, cfg.ppo,
                        work.ppo, corpus_texts=ptx_train, progress=False)
    summary = result.to_dict()
    summary.pop("config", None)  # the cycle's config is the source of truth
    summary["num_prompts"] = len(data.ppo_prompts)
    summary["last"] = result.history[-1] if result.history else {}
    return summary


def ppo_adapter_record(lineage: Lineage, work: CycleFolders) -> dict[str, Any] | None:
    """The candidate's manifest record of the LoRA adapters PPO wrote beside its merged weights
    (None: it wrote none). PPO writes them only when they sit on the SFT reference it was
    given (``trainer.ppo.load_lora_policy``), so that checkpoint is their base."""
    return adapter_record(lineage.reference_dir) if work.ppo_adapter.is_dir() else None


def evaluate_against_serving(serving: Policy, lineage: Lineage, data: CycleData, cfg: CycleConfig,
                             work: CycleFolders) -> dict[str, Any]:
    """Candidate vs serving on the held-out prompts, judged by the judge RM."""
    from trainer.evaluate import evaluate_candidate

    _, ptx_held_out = pretraining_texts(cfg)
    e = cfg.eval
    return evaluate_candidate(
        work.ppo, Path(serving.path), lineage.reference_dir, work.judge, work.rm, data.eval_prompts,
        ptx_held_out, max_new_tokens=e.max_new_tokens, temperature=e.temperature, batch_size=e.batch_size,
        ptx_max_length=e.ptx_max_length, seed=e.seed, kl_estimator=cfg.ppo.kl_estimator,
        kl_temperature=cfg.ppo.temperature, kl_samples_per_prompt=e.kl_samples_per_prompt,
        num_examples=e.keep_answers)


