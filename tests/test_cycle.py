"""trainer.cycle (the recipe), trainer.snapshot_data, trainer.gate and trainer.loop_config.

The full-cycle test runs every stage on the tiny model against a store filled directly,
with no server: the swap goes through `StoreSwapper`. tests/test_loop_e2e.py swaps on a
real server.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from loop_helpers import fill_store, publish_v0, tiny_cycle_config, tiny_trainer_config, users_in

from common.checkpoints import adapter_of, list_checkpoints, verify_checkpoint, write_checkpoint
from common.store import (
    Policy,
    Prompt,
    Store,
    add_demonstration,
    add_policy,
    claim_queued_cycle,
    create_cycle,
    get_cycle,
    list_policies,
    serving_policy,
    set_policy_status,
    update_cycle,
)
from trainer.cycle import CycleContext, CycleFolders, run_cycle
from trainer.examples import Comparison, PromptExample, user_turn
from trainer.gate import GateConfig, decide
from trainer.hygiene import PromptRecord
from trainer.loop_config import TrainerConfig, build_config, load_trainer_config
from trainer.publishing import StoreSwapper, apply_retention, clean_up_after_crashes, retained_versions, sft_version_of
from trainer.snapshot_data import StoreRows, messages_for, split_cycle_data
from trainer.trunk_cache import TrunkCache

STAGES = ["snapshot", "hygiene", "sft", "rm", "ppo", "evaluate", "gate", "publish", "swap", "record"]


@pytest.fixture
def loop(tmp_path: Path, tiny_model_dir: Path):
    """A store with v0 serving and a trainer config under tmp_path (no server)."""
    config = tiny_trainer_config(tmp_path)
    with Store(config.store_path) as store:
        publish_v0(store, config.checkpoints_root, tiny_model_dir)
        yield store, config


def start_cycle(store: Store) -> object:
    store.write_sync(create_cycle("cli"))
    return store.write_sync(claim_queued_cycle())


def run_one(store: Store, config: TrainerConfig, hook=None, trunk_cache: TrunkCache | None = None) -> object:
    context = CycleContext(store, config, StoreSwapper(store), **({"hook": hook} if hook else {}),
                           trunk_cache=trunk_cache)
    return run_cycle(start_cycle(store), context)


# ---------------------------------------------------------------------------- the whole recipe


def test_one_cycle_runs_every_stage_and_publishes_a_serving_candidate(loop) -> None:
    store, config = loop
    fill_store(store, now=time.time() - 60)

    cycle = run_one(store, config, trunk_cache=TrunkCache())

    assert cycle.state == "promoted", cycle.error
    assert cycle.error is None and cycle.stage == "record"
    assert sorted(cycle.metrics) == sorted(STAGES)  # every stage recorded its metrics
    assert all(cycle.metrics[s]["seconds"] >= 0 for s in STAGES)
    m = cycle.metrics
    assert m["hygiene"]["data"]["ppo_prompts"] == 12  # 3 train users x 4 prompts, all new
    assert m["sft"]["ran"] and m["sft"]["version"] == 1
    # RM: trained on train-split rankings (group A), measured on val (groups A and B)
    assert m["rm"]["rm"]["num_train"] == 12 and m["rm"]["rm"]["num_val"] == 8
    assert set(m["rm"]["rm"]["val"]["by_group"]) == {"A", "B"}
    # the (held-in) judge learns from group A's rankings of every prompt the gate does not
    # evaluate on (train's 12, val's 4), and is measured on rankings it never saw: the
    # evaluation prompts' and held-out B's (4)
    assert (m["rm"]["judge"]["num_train"], m["rm"]["judge"]["num_val"]) == (16, 4)
    # same SFT trunk: the RM ran every completion the judge needs through it (trainer.trunk_cache)
    assert m["rm"]["rm"]["trunk_computed"] > 0 and m["rm"]["rm"]["trunk_reused"] == 0
    assert m["rm"]["judge"]["trunk_computed"] == 0 and m["rm"]["judge"]["trunk_reused"] > 0
    assert m["ppo"]["num_prompts"] == 12
    assert 0 <= m["evaluate"]["judge_win_rate"] <= 1 and m["evaluate"]["num_prompts"] == 4
    kept = m["evaluate"]["examples"]  # the first cycle.eval.keep_answers (default 3) of the 4 prompts
    assert len(kept) == 3 and all(
        {"prompt", "candidate", "serving", "judge_candidate", "judge_serving"} <= set(e) for e in kept)
    assert m["gate"]["promote"] and m["swap"]["via"] == "store"

    # v1 = SFT (a new lineage), v2 = the PPO candidate, serving; both complete and recorded
    assert list_checkpoints(config.checkpoints_root) == [0, 1, 2]
    manifest = verify_checkpoint(config.checkpoints_root / "v2")
    assert (manifest.version, manifest.parent_version, manifest.cycle_id) == (2, 1, cycle.id)
    assert manifest.metrics["sft_version"] == 1 and manifest.base_model == "tiny-llama"
    assert manifest.adapter is None and m["ppo"]["adapter_base_dir"] is None  # full-mode PPO: merged weights only
    # both versions name the store snapshot they trained on (the file is gone with the scratch folder)
    assert manifest.snapshot["sha256"] == m["snapshot"]["sha256"] and len(m["snapshot"]["sha256"]) == 64
    assert verify_checkpoint(config.checkpoints_root / "v1").snapshot == manifest.snapshot
    assert manifest.snapshot["counts"]["rankings"] == m["snapshot"]["rankings"]
    policies = {p.version: p for p in store.read_sync(list_policies())}
    assert (policies[0].status, policies[1].status, policies[2].status) == ("retired", "candidate", "serving")
    assert sft_version_of(policies[2]) == 1 and policies[1].metrics["kind"] == "sft"
    assert (cycle.base_version, cycle.candidate_version) == (0, 2)
    assert not CycleFolders.of(config.work_dir, cycle.id).root.exists()  # scratch removed


def test_lora_cycles_publish_adapters_on_the_sft_reference_and_continue_them(tmp_path: Path,
                                                                           tiny_model_dir: Path) -> None:
    cycle_config = tiny_cycle_config()
    cycle_config.ppo = dataclasses.replace(cycle_config.ppo, train_mode="lora", lora_r=4, lora_alpha=8)
    config = tiny_trainer_config(tmp_path, cycle=cycle_config)
    root = config.checkpoints_root
    with Store(config.store_path) as store:
        publish_v0(store, root, tiny_model_dir)
        t0 = time.time() - 600
        fill_store(store, now=t0)
        first = run_one(store, config)
        fill_store(store, now=t0 + 300, demos=0, offset=40)  # new prompts, same demonstrations: no new SFT
        second = run_one(store, config)

    assert (first.state, second.state) == ("promoted", "promoted"), (first.error, second.error)
    assert (first.candidate_version, second.candidate_version) == (2, 3) and not second.metrics["sft"]["ran"]
    # v1 = SFT; v2's adapters were trained fresh on it, v3's continued v2's, on the same base.
    for version in (2, 3):
        adapters = adapter_of(root / f"v{version}", verify_checkpoint(root / f"v{version}"))
        assert adapters is not None and adapters.base_dir.resolve() == (root / "v1").resolve()
    for cycle in (first, second):
        assert Path(cycle.metrics["ppo"]["adapter_base_dir"]).resolve() == (root / "v1").resolve()


def test_held_out_labelers_train_nothing_at_the_cycle_level(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Group B is held out: its rankings only measure both reward models, and its
    demonstrations neither train SFT nor set the reward models' bias."""
    config = tiny_trainer_config(tmp_path, cycle=tiny_cycle_config(held_out_groups=["B"]))
    with Store(config.store_path) as store:
        publish_v0(store, config.checkpoints_root, tiny_model_dir)
        counts = fill_store(store, now=time.time() - 60, demos=2)  # 2 demonstrations, by group A
        train_prompts = store.read_sync(lambda db: [r["id"] for r in db.query(
            "SELECT id FROM prompts WHERE split = 'train' ORDER BY created_at, id")])
        for prompt_id in train_prompts[2:6]:  # 4 more, by a held-out labeler
            store.write_sync(add_demonstration(prompt_id, "labeler-B", "A held-out answer.", labeler_group="B"))
        cycle = run_one(store, config, trunk_cache=TrunkCache())
    assert cycle.state == "promoted", cycle.error
    m = cycle.metrics
    assert counts["demonstrations"] == 2 and m["hygiene"]["data"]["demonstrations_train"] <= 2
    assert m["sft"]["result"]["num_train"] == m["hygiene"]["data"]["demonstrations_train"]
    held_out = m["hygiene"]["data"]["comparisons_held_out"]
    assert held_out == 4  # group B ranked half of the val users' prompts
    # neither model trained on a B ranking; both were measured on all of them
    assert m["rm"]["rm"]["num_train"] == m["hygiene"]["data"]["comparisons_train"]
    for model in ("rm", "judge"):
        assert m["rm"][model]["val"]["by_group"]["B"]["num_comparisons"] == held_out
    assert m["rm"]["judge"]["num_train"] + m["rm"]["judge"]["num_val"] == (
        m["hygiene"]["data"]["comparisons_val"] + m["hygiene"]["data"]["comparisons_train"] + held_out)


def test_too_few_new_prompts_skips_the_cycle_before_training(loop) -> None:
    store, config = loop
    t0 = time.time() - 1000
    fill_store(store, now=t0)
    # An earlier cycle trained on everything logged up to t0 + 100 (its watermark).
    earlier = start_cycle(store)
    store.write_sync(update_cycle(earlier.id, state="promoted", stage_metrics={"snapshot": {"watermark": t0 + 100}}))
    fill_store(store, now=t0 + 200, users={"train": 1}, prompts_per_user=2, offset=40)  # 2 new < 4

    cycle = run_one(store, config)

    assert cycle.state == "skipped"
    assert cycle.error == "too little new data: ppo_prompts 2 < 4"
    assert cycle.stage == "hygiene" and "sft" not in cycle.metrics
    assert cycle.metrics["snapshot"]["since"] == t0 + 100
    assert list_checkpoints(config.checkpoints_root) == [0]


def test_a_failing_stage_fails_the_cycle_with_its_error(loop) -> None:
    store, config = loop
    fill_store(store, now=time.time() - 60)

    def hook(point: str) -> None:
        if point == "stage:sft":
            raise RuntimeError("disk on fire")

    cycle = run_one(store, config, hook)

    assert cycle.state == "failed" and cycle.stage == "sft"
    assert cycle.error.startswith("RuntimeError in stage sft") and cycle.error.endswith("disk on fire")
    assert "seconds" in cycle.metrics["sft"]  # the failed stage is recorded too
    assert store.read_sync(serving_policy()).version == 0
    assert list_checkpoints(config.checkpoints_root) == [0]
    assert not list(config.checkpoints_root.glob("*.tmp"))


# ---------------------------------------------------------------------------- retention and recovery


def policy(version: int, status: str, sft: int | None = None) -> Policy:
    return Policy(version, f"/ckpt/v{version}", None, status, 0.0, None,
                  {} if sft is None else {"sft_version": sft}, None)  # type: ignore[arg-type]


def test_retention_keeps_v0_serving_previous_and_their_sft_references() -> None:
    # v0 base; v1 SFT (lineage 1): v2, v3; v4 SFT (lineage 4): v5, v6, v7, v8 (serving v7, previous v3)
    policies = [policy(0, "retired"), policy(1, "candidate", 1), policy(2, "retired", 1), policy(3, "retired", 1),
                policy(4, "candidate", 4), policy(5, "rejected", 4), policy(6, "candidate", 4),
                policy(7, "serving", 4), policy(8, "candidate", 4)]
    keep = retained_versions(policies, previous=policies[3], on_disk=list(range(9)), keep_last=2)
    # newest two (7, 8) + v0 + serving 7 and its SFT 4 + previous 3 and its SFT 1
    assert keep == {0, 1, 3, 4, 7, 8}


def fake_checkpoint(root: Path, version: int, cycle_id: int | None) -> None:
    write_checkpoint(root, version, lambda d: (d / "model.safetensors").write_bytes(b"w" * version),
                     parent_version=None, cycle_id=cycle_id, base_model="tiny")


def test_apply_retention_deletes_only_what_the_rule_does_not_keep(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    with Store(tmp_path / "s.sqlite") as store:
        for v in range(6):
            fake_checkpoint(root, v, cycle_id=None if v == 0 else 1)
            store.write_sync(add_policy(v, str(root / f"v{v}"), metrics={"sft_version": 1} if v >= 1 else {}))
        for v in (2, 3):  # v2 served, then v3: v2 is the previous
            store.write_sync(set_policy_status(v, "serving"))
        outcome = apply_retention(store, root, keep_last=1)
    assert outcome["pruned"] == [4]  # kept: 0 (base), 1 (SFT), 2 (previous), 3 (serving), 5 (newest)
    assert list_checkpoints(root) == [0, 1, 2, 3, 5]


def test_clean_up_after_crashes_removes_partial_and_unrecorded_checkpoints(loop) -> None:
    store, config = loop
    root = config.checkpoints_root
    fake_checkpoint(root, 1, cycle_id=7)  # published by a cycle, never recorded: an orphan
    (root / "v2.tmp").mkdir()  # a write killed mid-way
    (config.work_dir / "cycle-7").mkdir(parents=True)  # the dead cycle's scratch

    cleaned = clean_up_after_crashes(store, root, CycleFolders.all_in(config.work_dir))

    assert cleaned == {"partial": ["v2.tmp"], "orphans": [1], "scratch": ["cycle-7"]}
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["v0"]


# ---------------------------------------------------------------------------- store rows -> records


def prompt_row(pid: str, user: str, text: str, t: float, messages=None, source="traffic") -> Prompt:
    return Prompt(pid, user, text, messages, source, "train", text.lower(), False, None, None,  # type: ignore[arg-type]
                  t)


def test_messages_for_replaces_the_last_user_turn_with_the_cleaned_text() -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "mail me at a@b.com"}]
    assert messages_for(prompt_row("p", "u", "mail me at a@b.com", 0, chat), "mail me at [EMAIL]") == (
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "mail me at [EMAIL]"})
    assert messages_for(prompt_row("p", "u", "plain", 0), "plain") == ({"role": "user", "content": "plain"},)


def test_split_cycle_data_selects_new_train_prompts_and_maps_rankings_by_split() -> None:
    from common.store.records import Completion, Ranking

    train_user, val_user = users_in("train", 1)[0], users_in("val", 1)[0]
    prompts = [prompt_row("old", train_user, "old one", 5.0), prompt_row("new", train_user, "new one", 15.0),
               prompt_row("imp", train_user, "imported", 16.0, source="label"),
               prompt_row("val", val_user, "val one", 17.0)]
    completions = {c: Completion(c, "val", 0, 0, f"text {c}", "stop", 1, 1, {}, 0.1, None, "serve", 17.0)
                   for c in ("c1", "c2", "c3")}
    rankings = [Ranking("r1", "val", "lab", "B", None, [["c2"], ["c1", "c3"]], 3, "label", 18.0),
                Ranking("r2", "gone", "lab", "A", None, [["c1"], ["c2"]], 2, "label", 18.0)]  # prompt dropped
    rows = StoreRows(prompts, completions, rankings, [])
    kept = [PromptRecord(p.id, p.user_id, p.text, p.created_at, "val" if p.id == "val" else "train")
            for p in prompts]

    data = split_cycle_data(rows, kept, since=10.0, until=20.0, max_ppo_prompts=8, ppo_sources=["traffic"],
                            eval_splits=["val"], max_eval_prompts=None)

    assert [p.prompt_id for p in data.ppo_prompts] == ["new"]  # not old (< since), not a "label" prompt
    assert [p.prompt_id for p in data.eval_prompts] == ["val"]
    (comparison,) = data.comparisons["val"]
    # c2 is best (rank 0); c1 and c3 are tied (rank 1)
    assert comparison.completions == ("text c2", "text c1", "text c3") and comparison.ranks == (0, 1, 1)
    assert comparison.labeler_group == "B" and data.comparisons["train"] == []
    assert data.demonstrations_sha256 == "" and data.held_out_comparisons == []

    # Group B held out (the paper's held-out labelers): its ranking measures, never trains.
    held = split_cycle_data(rows, kept, since=10.0, until=20.0, max_ppo_prompts=8, ppo_sources=["traffic"],
                            eval_splits=["val"], max_eval_prompts=None, held_out_groups=["B"])
    assert held.comparisons["val"] == [] and held.held_out_comparisons == [comparison]
    assert held.counts()["comparisons_held_out"] == 1 and held.counts()["comparisons_val"] == 0


def test_a_held_out_ranking_of_a_set_the_reward_model_trained_on_does_not_measure_it() -> None:
    """A shared (or gold) labeling task gives one completion set to several labelers: when a
    training labeler ranked it on the train split, the held-out labeler's ranking of the same
    set would score the reward model on data it trained on, so it is left out; the held-out
    ranking of a set no training labeler ranked stays."""
    from common.store.records import Completion, Ranking

    user = users_in("train", 1)[0]
    prompts = [prompt_row("shared", user, "shared one", 5.0), prompt_row("own", user, "own one", 6.0)]
    completions = {c: Completion(c, p, 0, 0, f"text {c}", "stop", 1, 1, {}, 0.1, None, "serve", 7.0)
                   for p, cs in (("shared", ("s1", "s2")), ("own", ("o1", "o2"))) for c in cs}
    rankings = [Ranking("rA", "shared", "alice", "A", None, [["s1"], ["s2"]], 2, "label", 8.0),
                Ranking("rB", "shared", "bob", "B", None, [["s2"], ["s1"]], 2, "label", 9.0),
                Ranking("rB2", "own", "bob", "B", None, [["o1"], ["o2"]], 2, "label", 9.0)]
    kept = [PromptRecord(p.id, p.user_id, p.text, p.created_at, "train") for p in prompts]
    data = split_cycle_data(StoreRows(prompts, completions, rankings, []), kept, since=0.0, until=20.0,
                            max_ppo_prompts=0, ppo_sources=["traffic"], eval_splits=["val"], max_eval_prompts=None,
                            held_out_groups=["B"])  # fmt: skip
    assert [c.prompt_id for c in data.comparisons["train"]] == ["shared"]
    assert [c.prompt_id for c in data.held_out_comparisons] == ["own"]


# ---------------------------------------------------------------------------- gate


def test_gate_promotes_only_within_every_bound() -> None:
    evaluation = {"judge_win_rate": 0.6, "p_value": 0.2, "kl_to_sft": 3.0, "ptx_regression": 0.05, "judge_accuracy": 0.7}
    bounds = GateConfig(min_win_rate=0.55, max_p_value=None, max_kl_per_token=5.0, max_ptx_regression=0.1)
    assert decide(evaluation, bounds).promote
    strict = GateConfig(min_win_rate=0.55, max_p_value=0.05, max_kl_per_token=2.0, max_ptx_regression=0.1)
    decision = decide(evaluation, strict)
    assert not decision.promote
    assert decision.reason == "p_value 0.2 <= 0.05 failed; kl_to_sft 3 <= 2 failed"
    assert decision.to_dict()["checks"]["win_rate"]["passed"]
    # A candidate that answers a quarter of the prompts with nothing is refused when bounded.
    collapsed = evaluation | {"empty_fraction_candidate": 0.25}
    assert decide(collapsed, bounds).promote  # unbounded by default
    refused = decide(collapsed, GateConfig(min_win_rate=0.55, max_kl_per_token=5.0, max_empty_fraction=0.1))
    assert not refused.promote and refused.reason == "empty_fraction 0.25 <= 0.1 failed"
    # A tie is not better: the win rate must exceed its bound (0 disables the check).
    tie = decide(evaluation | {"judge_win_rate": 0.5}, GateConfig(min_win_rate=0.5, max_kl_per_token=5.0))
    assert not tie.promote and tie.reason == "win_rate 0.5 > 0.5 failed"
    assert decide(evaluation | {"judge_win_rate": 0.0}, GateConfig(min_win_rate=0.0, max_kl_per_token=5.0)).promote
    # A judge at chance on rankings it never saw promotes nothing, however much it likes the candidate.
    at_chance = decide(evaluation | {"judge_accuracy": 0.5, "judge_win_rate": 0.9}, bounds)
    assert not at_chance.promote and at_chance.reason == "judge_accuracy 0.5 >= 0.55 failed"
    unmeasured = decide({k: v for k, v in evaluation.items() if k != "judge_accuracy"}, bounds)
    assert not unmeasured.promote and "judge_accuracy nan" in unmeasured.reason


def test_the_judge_never_trains_on_the_prompts_the_gate_evaluates_on() -> None:
    from trainer.cycle import judge_split
    from trainer.snapshot_data import CycleData

    def comparison(prompt_id: str, group: str = "A") -> Comparison:
        return Comparison(user_turn(prompt_id), ("a", "b"), (0, 1), labeler_group=group, prompt_id=prompt_id)

    data = CycleData(ppo_prompts=[], eval_prompts=[PromptExample("v1", user_turn("v1"))],
                     comparisons={"train": [comparison("t1"), comparison("t2"), comparison("t3")],
                                  "val": [comparison("v1"), comparison("v2")], "test": []},
                     held_out_comparisons=[comparison("v2", "B")])
    train, unseen = judge_split(data, train_split_sample=2, rankings="val")
    assert [c.prompt_id for c in train] == ["v2"]
    assert [(c.prompt_id, c.labeler_group) for c in unseen] == [("v1", "A"), ("t2", "A"), ("t3", "A"), ("v2", "B")]
    # The held-in judge trains on the train split's rankings too, so they cannot measure it;
    # the evaluation prompts' and the held-out labelers' still do.
    train, unseen = judge_split(data, train_split_sample=2, rankings="held_in")
    assert [c.prompt_id for c in train] == ["t1", "t2", "t3", "v2"]
    assert [(c.prompt_id, c.labeler_group) for c in unseen] == [("v1", "A"), ("v2", "B")]
    # Enough data counts only the judge's own rankings: with every val prompt evaluated, a
    # val-split judge has none and the cycle skips; a held-in judge still has the train split's.
    from trainer.cycle import CycleSkipped, check_enough_data
    from trainer.loop_config import DataConfig

    data.ppo_prompts = [PromptExample("t9", user_turn("t9"))]
    need = DataConfig(min_new_prompts=1, min_train_comparisons=1, min_val_comparisons=1, judge_rankings="val")
    check_enough_data(data, need)
    data.eval_prompts.append(PromptExample("v2", user_turn("v2")))
    with pytest.raises(CycleSkipped, match="judge_comparisons 0 < 1"):
        check_enough_data(data, need)
    check_enough_data(data, DataConfig(min_new_prompts=1, min_train_comparisons=1, min_val_comparisons=3))
    with pytest.raises(CycleSkipped, match="judge_comparisons 3 < 4"):
        check_enough_data(data, DataConfig(min_new_prompts=1, min_train_comparisons=1, min_val_comparisons=4))


# ---------------------------------------------------------------------------- config


def test_config_from_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "trainer.toml"
    path.write_text('schedule = "cron"\ncron = "*/30 * * * *"\nserver_address = "127.0.0.1:6000"\n'
                    "[cycle.data]\nmin_new_prompts = 8\n[cycle.ppo]\nkl_coef = 0.1\niterations = 3\n")
    config = load_trainer_config(path, ["cycle.ppo.iterations=5", "cycle.gate.max_kl_per_token=none", "poll_s=0.5"])
    assert (config.schedule, config.cron, config.poll_s) == ("cron", "*/30 * * * *", 0.5)
    assert (config.cycle.ppo.kl_coef, config.cycle.ppo.iterations) == (0.1, 5)  # the override wins
    assert config.cycle.data.min_new_prompts == 8 and config.cycle.gate.max_kl_per_token is None
    assert isinstance(config.store_path, Path)

    json_path = tmp_path / "trainer.json"
    json_path.write_text(json.dumps({"cycle": {"sft": {"epochs": 2}}, "keep_last": 5}))
    assert load_trainer_config(json_path).cycle.sft.epochs == 2


@pytest.mark.parametrize("overrides, message", [
    (["cycle.ppo.nope=1"], "Unknown PPOConfig field: nope"),
    (["cycle.data.min_new_prompts=0"], "min_new_prompts must be >= 1"),
    (["schedule=weekly"], "schedule must be interval | cron | off"),
    (["cron=not a cron", "schedule=cron"], "Wrong number of fields"),
    (["cycle.data.eval_splits=[\"train\"]"], "never train"),
    (["cycle.data.judge_rankings=everything"], "judge_rankings must be one of \\['held_in', 'val'\\]"),
])
def test_config_rejects_bad_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_trainer_config(None, overrides)


def test_build_config_rejects_unknown_sections() -> None:
    with pytest.raises(ValueError, match="Unknown CycleConfig section: nope"):
        build_config(TrainerConfig, {"cycle": {"nope": {"x": 1}}})


def test_failed_cycle_is_visible_to_readers_of_the_store(loop) -> None:
    """The recorded error is what `rlhf cycles` and Admin.GetCycle show."""
    store, config = loop
    cycle = run_one(store, config)  # an empty store: nothing new, nothing to rank
    stored = store.read_sync(get_cycle(cycle.id))
    assert stored.state == "skipped" and stored.error.startswith("too little new data: ppo_prompts 0 < 4")
