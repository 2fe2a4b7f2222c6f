"""The RM's frozen-trunk cache: same results as computing, reuse across trainings, its key, its bound."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_reward_model import fast_config, marker_comparisons
from trainer.examples import Demonstration, user_turn
from trainer.reward_model import RewardModel
from trainer.rm_training import train_reward_model
from trainer.trunk_cache import TrunkCache, model_fingerprint, trunk_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def frozen_rm(tiny_model_dir) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu").eval()


def rows_of_lengths(*lengths: int, start: int = 0) -> list[list[int]]:
    """Distinct token rows (row j starts with token j + start + 3)."""
    return [[(j + start + 3 + 7 * i) % 50 + 3 for i in range(n)] for j, n in enumerate(lengths)]


def test_states_equal_a_fresh_trunk_pass_and_repeats_are_computed_once(frozen_rm, tiny_model_dir):
    rows = rows_of_lengths(9, 4, 13, 4)
    rows.append(list(rows[0]))  # a repeat
    cache = TrunkCache()
    key = trunk_key(tiny_model_dir, 1, frozen_rm)
    calls = frozen_rm.forward_calls
    states = cache.states(frozen_rm, key, rows, top_layers=1, pad_token_id=0, batch_size=2)
    assert frozen_rm.forward_calls - calls == 4 and cache.computed == 4 and len(cache) == 4
    for row, got in zip(rows, states):
        with torch.no_grad():
            alone = frozen_rm.trunk_rows(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), 1)[0]
        assert got.shape == alone.shape
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)

    again = cache.states(frozen_rm, key, rows[:2], top_layers=1, pad_token_id=0, batch_size=2)
    assert cache.computed == 4 and cache.reused == 2  # nothing new ran
    assert all(torch.equal(a, b) for a, b in zip(again, states[:2]))


@pytest.mark.parametrize("top_layers, head, last_state", [(1, "last_token", True), (0, "pooled", True),
                                                     (0, "pooled", False)])
def test_rows_sharing_a_prompt_run_it_once_and_get_the_same_states(tiny_model_dir, top_layers, head, last_state):
    """prefix_lengths: a prompt's K completions share its keys and values (one prompt pass);
    each row's states equal a fresh pass of the whole row (up to float rounding), on the whole
    backbone and on one cut at the deepest pooled layer alike."""
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head=head,
                                        pool_depths=(0.0, 0.5), head_last_state=last_state).eval()
    prompt_a, prompt_b = rows_of_lengths(11, 7, start=20)
    rows = [prompt_a + r for r in rows_of_lengths(5, 1, 9)] + [prompt_b + r for r in rows_of_lengths(3, 6)]
    prefixes = [len(prompt_a)] * 3 + [len(prompt_b)] * 2
    cache = TrunkCache()
    states = cache.states(rm, None, rows, top_layers, pad_token_id=0, batch_size=2, prefix_lengths=prefixes)
    assert cache.computed == 5
    for row, got in zip(rows, states):
        with torch.no_grad():
            alone = rm.trunk_rows(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), top_layers)[0]
        width = 128 if top_layers else 128 * len(rm.pool_layers)  # the head's rows: every pooled layer
        assert got.shape == alone.shape == (len(row) + (top_layers == 0), width)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-4)


def test_a_new_frozen_trunk_empties_the_cache(frozen_rm, tiny_model_dir, tmp_path):
    """The key is the weights' CONTENT: a copy elsewhere is the same trunk, changed weights are not."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    weights = load_file(str(changed / "model.safetensors"))
    name = next(n for n in weights if "layers.0." in n)
    weights[name] = weights[name] + 0.01
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(changed) != model_fingerprint(tiny_model_dir)

    cache, rows = TrunkCache(), rows_of_lengths(5, 6)
    cache.states(frozen_rm, trunk_key(tiny_model_dir, 1, frozen_rm), rows, 1, 0, 8)
    cache.states(frozen_rm, trunk_key(copy, 1, frozen_rm), rows, 1, 0, 8)
    assert (cache.computed, cache.reused) == (2, 2)
    cache.states(frozen_rm, trunk_key(changed, 1, frozen_rm), rows, 1, 0, 8)
    assert (cache.computed, len(cache)) == (4, 2)  # recomputed; the old trunk's rows are gone
    with pytest.raises(ValueError, match="top layers"):
        cache.states(frozen_rm, trunk_key(changed, 1, frozen_rm), rows, 2, 0, 8)


def test_other_pooled_layers_or_a_cut_trunk_empty_the_cache(tiny_model_dir):
    """Rows of the head alone hold the pooled layers' states and the last state of the layers
    run: another choice of either is another trunk."""
    def rm(depths, last_state):
        return RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head="pooled",
                                              pool_depths=depths, head_last_state=last_state).eval()

    cache, rows = TrunkCache(), rows_of_lengths(5, 6)
    for model in (rm((0.0, 0.5), True), rm((0.5,), True), rm((0.5,), False)):
        cache.states(model, trunk_key(tiny_model_dir, 0, model), rows, 0, 0, 8)
        assert (cache.reused, len(cache)) == (0, 2)  # every model's rows computed afresh
    assert cache.computed == 6


def test_the_least_recently_used_rows_go_first(frozen_rm, tiny_model_dir):
    rows = rows_of_lengths(10, 10, 10)
    one_row = 10 * frozen_rm.hidden_size * 4  # (length, H) float32
    cache = TrunkCache(max_mb=2.5 * one_row / 2**20)  # room for two rows
    key = trunk_key(tiny_model_dir, 1, frozen_rm)
    cache.states(frozen_rm, key, rows[:2], 1, 0, 8)
    cache.states(frozen_rm, key, rows[:1], 1, 0, 8)  # row 0 is now the most recent
    cache.states(frozen_rm, key, rows[2:], 1, 0, 8)  # row 1 is evicted
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    computed = cache.computed
    cache.states(frozen_rm, key, rows[:1] + rows[2:], 1, 0, 8)
    assert cache.computed == computed
    cache.states(frozen_rm, key, rows[1:2], 1, 0, 8)
    assert cache.computed == computed + 1


def demonstrations() -> list[Demonstration]:
    return [Demonstration(user_turn(f"Say something ({i})"), f"yes apple river {i}") for i in range(4)]


def test_a_shared_cache_changes_nothing_but_the_work(tiny_model_dir, tmp_path):
    """Two trainings on one frozen trunk: the second computes only its new completions, and
    both give what training without the cache gives (losses, accuracy, bias, weights)."""
    first, more, val = marker_comparisons(8, seed=1), marker_comparisons(4, seed=2), marker_comparisons(6, seed=3)
    config = fast_config(epochs=2, train_mode="top_layers", head="last_token", top_layers=1)
    cache = TrunkCache()
    runs = {}
    for name, comparisons, shared in (("a", first, cache), ("b", first + more, cache), ("plain", first + more, None)):
        runs[name] = train_reward_model(tiny_model_dir, comparisons, val, config, tmp_path / name,
                                        demonstrations=demonstrations(), trunk_cache=shared)
    a, b, plain = runs["a"], runs["b"], runs["plain"]
    completions = 4 * (len(first) + len(val)) + len(demonstrations())
    assert (a.trunk_computed, a.trunk_reused) == (completions, 0)
    assert b.trunk_computed == 4 * len(more)  # only the new rankings' completions ran
    assert b.trunk_reused == completions
    assert b.forward_passes == 4 * len(more)
    assert plain.trunk_computed == 4 * len(first + more + val) + len(demonstrations()) and plain.trunk_reused == 0

    for x, y in zip(b.epochs, plain.epochs):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)
    assert b.val["accuracy"] == plain.val["accuracy"]
    assert b.bias == pytest.approx(plain.bias, abs=1e-4)
    torch.testing.assert_close(load_file(str(tmp_path / "b" / "model.safetensors"))["layers.1.mlp.up_proj.weight"],
                               load_file(str(tmp_path / "plain" / "model.safetensors"))["layers.1.mlp.up_proj.weight"],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("recipe", [{"train_mode": "top_layers", "head": "last_token", "top_layers": 1},
                                    {"train_mode": "head", "head": "pooled", "pool_depths": [0.0, 0.5]}])
def test_scores_from_the_trunk_equal_the_saved_models_scores(tiny_model_dir, tmp_path, recipe):
    """Validation and bias read cached states: the saved RM, scoring with its full forward,
    gives demonstrations mean 0 (the bias was set from trunk scores)."""
    config = fast_config(epochs=1, **recipe)
    train_reward_model(tiny_model_dir, marker_comparisons(6, seed=5), [], config, tmp_path / "rm",
                       demonstrations=demonstrations(), trunk_cache=TrunkCache())
    rm = RewardModel.load(tmp_path / "rm", device="cpu")
    demos = demonstrations()
    scores = rm.score_texts(rm.tokenizer, [d.messages for d in demos], [d.response for d in demos])
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
