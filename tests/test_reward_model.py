"""The K-way reward model: one forward per completion, learning, bias, save/load, train modes, CLI."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import RMConfig
from trainer.examples import Comparison, Demonstration, user_turn
from trainer.losses import ranking_loss
from trainer.reward_model import RewardModel
from trainer.rm_heads import last_token_index
from trainer.rm_training import (
    comparison_batch,
    encode_comparisons,
    kway_loss,
    micro_batches,
    train_reward_model,
)
from trainer.torch_parts import decoder_layers

WORDS = "apple river stone cloud green table music paper light window garden orange silver forest".split()
MARKER = "yes"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def marker_comparisons(n: int, seed: int, k: int = 4, group: str = "") -> list[Comparison]:
    """Completions with the marker word rank 0 (tied among themselves), the rest rank 1."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        good = set(rng.sample(range(k), k // 2))
        completions, ranks = [], []
        for j in range(k):
            words = rng.sample(WORDS, 4)
            if j in good:
                words.insert(rng.randrange(5), MARKER)
            completions.append(" ".join(words))
            ranks.append(0 if j in good else 1)
        out.append(Comparison(user_turn(f"Say something ({seed}-{i})"), tuple(completions), tuple(ranks),
                              labeler_group=group or ("train" if i % 2 else "heldout")))
    return out


def strict_comparisons(ks: list[int], seed: int = 0) -> list[Comparison]:
    """One comparison per K with a strict ranking (no ties): C(K, 2) ordered pairs each."""
    rng = random.Random(seed)
    return [Comparison(user_turn(f"prompt {i}"), tuple(" ".join(rng.sample(WORDS, 3)) for _ in range(k)),
                       tuple(rng.sample(range(k), k)))
            for i, k in enumerate(ks)]


def fast_config(**overrides) -> RMConfig:
    base = {"learning_rate": 3e-3, "epochs": 2, "batch_size": 4, "num_threads": 1, "show_progress": False}
    return RMConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One RM trained on the marker preference (top_layers, the CPU default), reused below."""
    out = tmp_path_factory.mktemp("rm")
    demos = [Demonstration(user_turn(f"Say something ({i})"), f"{WORDS[i]} {MARKER} {WORDS[i + 1]}")
             for i in range(6)]
    val = marker_comparisons(24, seed=1)
    result = train_reward_model(tiny_model_dir, marker_comparisons(48, seed=0), val,
                                fast_config(train_mode="top_layers", head="last_token"), out, demonstrations=demos)
    return result, out, demos, val


# ---------------------------------------------------------------------------- one forward per completion


@pytest.mark.parametrize("k", [4, 9])
def test_one_forward_per_completion(tiny_rm, k):
    """P = 3 prompts of K completions: exactly 3K sequences through the backbone, in ONE call."""
    comparisons = strict_comparisons([k, k, k])
    items = encode_comparisons(tiny_rm.tokenizer, comparisons, max_response_length=32)
    rows_seen = []
    handle = tiny_rm.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    before = tiny_rm.forward_calls
    try:
        loss, stats = kway_loss(tiny_rm, items, tiny_rm.tokenizer.pad_token_id, max_length=None)
        loss.backward()
    finally:
        handle.remove()
        tiny_rm.zero_grad(set_to_none=True)
    assert tiny_rm.forward_calls - before == 3 * k
    assert rows_seen == [3 * k]  # one backbone call; never two passes per pair
    assert int(stats.num_pairs) == 3 * k * (k - 1) // 2  # all C(K, 2) pairs of each prompt


def test_training_counts_one_forward_per_completion(tiny_model_dir, tmp_path):
    """Mixed K = 2..9 over one epoch: forward passes == sum of K, however the steps are cut."""
    ks = [2, 3, 4, 5, 6, 7, 8, 9]
    config = fast_config(epochs=1, batch_size=3, max_completions_per_step=10, train_mode="top_layers", head="last_token")
    result = train_reward_model(tiny_model_dir, strict_comparisons(ks), [], config, tmp_path / "rm")
    assert result.forward_passes == sum(ks)  # 44 sequences, not 2 * 120 pairs = 240


def test_kway_loss_equals_mean_of_per_prompt_ranking_losses(tiny_rm):
    """Padding to Kmax must not leak: the batched loss is the mean of each prompt's own loss."""
    comparisons = strict_comparisons([2, 5, 3], seed=3)
    items = encode_comparisons(tiny_rm.tokenizer, comparisons, max_response_length=32)
    tiny_rm.eval()
    with torch.no_grad():
        loss, _ = kway_loss(tiny_rm, items, tiny_rm.tokenizer.pad_token_id, max_length=None)
        expected = torch.stack([
            ranking_loss(tiny_rm.score_texts(tiny_rm.tokenizer, [c.messages] * len(c.completions),
                                             list(c.completions)), torch.tensor(c.ranks))
            for c in comparisons]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_micro_batches_keep_prompts_whole():
    items = encode_comparisons_stub([4, 4, 9, 2, 3])
    groups = micro_batches(items, max_sequences=8)
    # 4+4 = 8 fits; 9 exceeds the cap alone but is never split; 2+3 = 5.
    assert [[len(i.completion_ids) for i in g] for g in groups] == [[4, 4], [9], [2, 3]]


def encode_comparisons_stub(ks):
    from trainer.rm_training import EncodedComparison

    return [EncodedComparison([1], [[2, 3]] * k, list(range(k))) for k in ks]


def test_all_tied_comparisons_are_skipped(tiny_model_dir, tmp_path):
    tied = Comparison(user_turn("tied"), ("a", "b", "c"), (0, 0, 0))
    result = train_reward_model(tiny_model_dir, [tied, *strict_comparisons([3])], [],
                                fast_config(epochs=1), tmp_path / "rm")
    assert result.skipped_all_tied == 1
    assert result.num_train == 1
    assert result.forward_passes == 3


# ---------------------------------------------------------------------------- learning and bias


def test_rm_learns_a_synthetic_preference(trained):
    """Held-out comparisons (other prompts, other word draws): >= 90% pairwise accuracy."""
    result, _, _, val = trained
    assert result.val["accuracy"] >= 0.9, result.val
    assert result.val["num_pairs"] == 24 * 4  # 2 good x 2 bad per K = 4 comparison
    assert set(result.val["by_group"]) == {"train", "heldout"}
    for group in result.val["by_group"].values():
        assert group["num_comparisons"] == 12
        assert group["accuracy"] >= 0.8
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
    json.dumps(result.to_dict())  # JSON-serialisable


def graded_rule_comparisons(n: int, seed: int, noise_p: float, k: int = 9) -> list[Comparison]:
    """K = 9 completions of 3..12 words, scored by a hidden graded rule (+1 per marker word,
    -0.1 per word), ranked by a simulated labeler who is random with probability 2p
    (``clients.simulated_labeler.noisy_ranking``: each pair flipped with probability p)."""
    from clients.simulated_labeler import noisy_ranking

    rng = random.Random(seed)
    out = []
    for i in range(n):
        completions, scores = [], []
        for _ in range(k):
            words = rng.choices(WORDS, k=rng.randint(3, 12))
            for _ in range(rng.randint(0, 2)):
                words.insert(rng.randrange(len(words) + 1), MARKER)
            completions.append(" ".join(words))
            scores.append(words.count(MARKER) - 0.1 * len(words))
        groups = noisy_ranking(scores, noise_p, rng)
        ranks = tuple(next(r for r, g in enumerate(groups) if j in g) for j in range(k))
        out.append(Comparison(user_turn(f"Say something ({seed}-{i})"), tuple(completions), ranks))
    return out


def test_the_default_rm_learns_a_hidden_rule_from_noisy_rankings(tiny_model_dir, tmp_path):
    """The default recipe (pooled head on the frozen, cached trunk) on 120 rankings of K = 9 by a
    labeler who flips each pair with p = 0.16 (4,320 noisy pairs): on UNSEEN prompts it agrees
    with the noise-free rule on >= 75% of pairs (chance: 50%; a perfect RM: 100%; measured 0.85)."""
    train = graded_rule_comparisons(120, seed=0, noise_p=0.16)
    unseen = graded_rule_comparisons(20, seed=1, noise_p=0.0)  # the rule's own order
    result = train_reward_model(tiny_model_dir, train, unseen, RMConfig(num_threads=1, show_progress=False),
                                tmp_path / "rm")
    assert (result.head, result.train_mode, result.trunk_cached) == ("pooled", "head", True)
    assert result.val["accuracy"] >= 0.75, result.val
    assert result.forward_passes == 120 * 9  # the trunk ran once per completion, for all epochs


def test_bias_makes_demonstrations_score_mean_zero(trained):
    result, out, demos, _ = trained
    assert result.bias_source == "demonstrations"
    rm = RewardModel.load(out, dtype="float32", device="cpu")
    scores = rm.score_texts(rm.tokenizer, [d.messages for d in demos], [d.response for d in demos])
    torch.testing.assert_close(scores.mean(), torch.tensor(0.0), atol=1e-4, rtol=0)
    assert scores.std() > 0  # the bias shifts, it does not flatten
    torch.testing.assert_close(torch.tensor(result.bias), rm.bias, atol=1e-6, rtol=0)


def test_bias_from_bias_prompts(tiny_model_dir, tmp_path):
    pairs = [(user_turn("q1"), "some answer"), (user_turn("q2"), "another answer here")]
    result = train_reward_model(tiny_model_dir, strict_comparisons([3, 4]), [], fast_config(epochs=1),
                                tmp_path / "rm", bias_prompts=pairs)
    rm = RewardModel.load(tmp_path / "rm", device="cpu")
    scores = rm.score_texts(rm.tokenizer, [m for m, _ in pairs], [r for _, r in pairs])
    assert result.bias_source == "bias_prompts"
    torch.testing.assert_close(scores.mean(), torch.tensor(0.0), atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=[("last_token", 1, True), ("pooled", 1, True), ("pooled", 3, True),
                                        ("pooled", 3, False)])
def any_head_rm(request, tiny_model_dir) -> RewardModel:
    torch.manual_seed(0)
    head, ensemble, last_state = request.param
    rm = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head=head,
                                        pool_depths=(0.0, 0.5), head_ensemble=ensemble, head_last_state=last_state)
    with torch.no_grad():  # a non-trivial standardisation, so that saving it matters
        for buffer in rm.head.buffers():
            buffer.uniform_(0.5, 1.5)
    return rm


def test_save_load_round_trip_gives_identical_scores(any_head_rm, tmp_path):
    rm = any_head_rm
    rm.set_bias(0.75)
    prompts = [user_turn("a question"), user_turn("another, longer question here")]
    responses = ["short", "a much longer response with several words"]
    before = rm.score_texts(rm.tokenizer, prompts, responses, stopped=[True, False])
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm", dtype="float32", device="cpu")
    after = loaded.score_texts(loaded.tokenizer, prompts, responses, stopped=[True, False])
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert float(loaded.bias) == 0.75 and loaded.head_kind == rm.head_kind and loaded.pool_layers == rm.pool_layers
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["bias"] == 0.75 and meta["hidden_size"] == 128 and meta["head"] == rm.head_kind
    rm.set_bias(0.0)


def test_a_head_without_the_final_state_cuts_the_backbone_and_scores_the_same(tiny_model_dir, tmp_path):
    """A pooled head that reads no final state reads nothing above its deepest pooled layer:
    the RM keeps only the layers up to it (the tiny model's layer 1 of 2), scores exactly as
    the same head on the whole backbone, and saves a plain model of the kept layers."""
    torch.manual_seed(0)
    cut = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head="pooled",
                                         pool_depths=(0.0, 0.5), head_last_state=False)
    whole = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head="pooled",
                                           pool_depths=(0.0, 0.5), head_last_state=True)
    head = copy.deepcopy(cut.head)
    whole.head, whole.pool_layers = head, cut.pool_layers  # the same head on all the layers
    assert (cut.cut_at, len(cut.backbone.layers), len(whole.backbone.layers)) == (1, 1, 2)
    texts = ([user_turn("a question"), user_turn("another one")], ["an answer", "a longer answer with words"])
    expected = whole.score_texts(whole.tokenizer, *texts)
    torch.testing.assert_close(cut.score_texts(cut.tokenizer, *texts), expected, rtol=1e-5, atol=1e-5)
    cut.save(tmp_path / "rm")
    weights = _layer_weights(tmp_path / "rm")
    assert "norm.weight" in weights and not any(name.startswith("layers.1.") for name in weights)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["num_hidden_layers"] == 1
    loaded = RewardModel.load(tmp_path / "rm", dtype="float32", device="cpu")
    assert (loaded.cut_at, len(loaded.backbone.layers), loaded.head.reads_final) == (1, 1, False)
    torch.testing.assert_close(loaded.score_texts(loaded.tokenizer, *texts), expected, rtol=1e-5, atol=1e-5)


def test_a_head_pooling_the_final_layer_keeps_the_whole_backbone(tiny_model_dir):
    """The final layer's pooled states are the normed ones: nothing to cut."""
    rm = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head="pooled",
                                        pool_depths=(0.0, 1.0), head_last_state=False)
    assert rm.cut_at is None and len(rm.backbone.layers) == 2


def test_a_reward_model_saved_with_one_pooled_layer_still_loads(tiny_model_dir, tmp_path):
    """Folders written before several layers were pooled name one ``pool_layer``."""
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head="pooled",
                                        pool_depths=(0.5,))
    rm.save(tmp_path / "rm")
    meta_file = tmp_path / "rm" / "reward_model.json"
    meta = json.loads(meta_file.read_text())
    meta["pool_layer"] = meta.pop("pool_layers")[0]
    meta_file.write_text(json.dumps(meta))
    loaded = RewardModel.load(tmp_path / "rm", dtype="float32", device="cpu")
    assert loaded.pool_layers == (1,)
    texts = ([user_turn("a question")], ["an answer"])
    torch.testing.assert_close(loaded.score_texts(loaded.tokenizer, *texts), rm.score_texts(rm.tokenizer, *texts))


def test_a_format_1_folder_still_loads_as_a_last_token_head(tiny_rm, tmp_path):
    """Reward models saved before the pooled head (format 1: a bare linear head) keep working."""
    from safetensors.torch import save_file

    tiny_rm.save(tmp_path / "rm")
    head = {"weight": tiny_rm.head.linear.weight.detach().clone(), "bias": tiny_rm.head.linear.bias.detach().clone(),
            "score_bias": torch.tensor(0.5)}
    save_file(head, str(tmp_path / "rm" / "reward_head.safetensors"))
    meta_path = tmp_path / "rm" / "reward_model.json"
    meta = json.loads(meta_path.read_text())
    meta = {k: v for k, v in meta.items() if k not in ("head", "head_features")} | {"format": 1}
    meta_path.write_text(json.dumps(meta))
    loaded = RewardModel.load(tmp_path / "rm", dtype="float32", device="cpu")
    texts = (tiny_rm.tokenizer, [user_turn("q")], ["an answer"])
    torch.testing.assert_close(loaded.score_texts(*texts), tiny_rm.score_texts(*texts) + 0.5)


def test_a_cut_response_is_scored_without_eos(tiny_rm):
    """stopped=False: the policy hit its budget, so the RM reads the last word, not an EOS."""
    prompts, responses = [user_turn("q")] * 2, ["an answer that was cut"] * 2
    scores = tiny_rm.score_texts(tiny_rm.tokenizer, prompts, responses, stopped=[True, False])
    assert scores[0] != scores[1]


def test_per_token_values_at_last_token_equal_the_score(any_head_rm):
    from common.chat import render_chat_ids
    from trainer.data import encode_response, pack_sequences

    rm, tok = any_head_rm, any_head_rm.tokenizer
    batch = pack_sequences([render_chat_ids(tok, user_turn("hi")), render_chat_ids(tok, user_turn("hello there"))],
                           [encode_response(tok, "one two three"), encode_response(tok, "x")], tok.pad_token_id)
    rm.eval()
    with torch.no_grad():
        scores = rm(batch.input_ids, batch.attention_mask, batch.response_mask)  # (B,)
        values = rm.per_token_values(batch.input_ids, batch.attention_mask, batch.response_mask)  # (B, T)
    assert values.shape == batch.input_ids.shape
    torch.testing.assert_close(values[torch.arange(2), last_token_index(batch.attention_mask)], scores, rtol=1e-5, atol=1e-5)


def test_pooled_values_are_the_scores_of_the_response_cut_at_each_token(tiny_model_dir):
    """V(s_t) of the pooled head = the score the RM gives the response ending at t: the pools
    are causal (cumulative max, mean, sum over the response so far)."""
    from common.chat import render_chat_ids
    from trainer.data import pack_sequences

    torch.manual_seed(1)
    rm = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head="pooled",
                                        pool_depths=(0.0, 0.5)).eval()
    tok = rm.tokenizer
    prompt, response = render_chat_ids(tok, user_turn("hello there")), tok("one two three four", add_special_tokens=False)["input_ids"]
    full = pack_sequences([prompt], [response], tok.pad_token_id)
    with torch.no_grad():
        values = rm.per_token_values(full.input_ids, full.attention_mask, full.response_mask)[0]  # (T,)
        for n in range(1, len(response) + 1):
            cut = pack_sequences([prompt], [response[:n]], tok.pad_token_id)
            score = rm(cut.input_ids, cut.attention_mask, cut.response_mask)[0]
            torch.testing.assert_close(values[len(prompt) + n - 1], score, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- train modes


def _layer_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_top_layers_mode_freezes_the_lower_layers(tiny_model_dir, tmp_path):
    base = RewardModel.from_pretrained_lm(tiny_model_dir, device="cpu")
    base.save(tmp_path / "base")
    result = train_reward_model(tiny_model_dir, strict_comparisons([4, 4]), [],
                                fast_config(epochs=1, train_mode="top_layers", head="last_token", top_layers=1), tmp_path / "rm")
    before, after = _layer_weights(tmp_path / "base"), _layer_weights(tmp_path / "rm")
    assert torch.equal(before["embed_tokens.weight"], after["embed_tokens.weight"])
    assert torch.equal(before["layers.0.mlp.up_proj.weight"], after["layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["layers.1.mlp.up_proj.weight"], after["layers.1.mlp.up_proj.weight"])
    assert result.trainable_params < result.total_params


def test_scores_from_cached_trunk_equal_the_full_forward(tiny_rm):
    """The states entering the top layer, run through it alone, give forward()'s scores
    (right-padded rows of different lengths included)."""
    items = encode_comparisons(tiny_rm.tokenizer, strict_comparisons([3, 4], seed=5), max_response_length=32)
    batch, *_ = comparison_batch(items, tiny_rm.tokenizer.pad_token_id, None)
    assert batch.attention_mask.sum(dim=1).unique().numel() > 1  # rows really differ in length
    tiny_rm.eval()
    with torch.no_grad():
        full = tiny_rm(batch.input_ids, batch.attention_mask)
        rows = tiny_rm.trunk_rows(batch.input_ids, batch.attention_mask, top_layers=1)
        lengths = [len(ids) for item in items for ids in item.completion_ids]
        top_only = tiny_rm.scores_from_trunk(rows, lengths, top_layers=1)
    torch.testing.assert_close(top_only, full, rtol=0, atol=1e-5)
    assert len(decoder_layers(tiny_rm.backbone)) == 2  # the swap is undone


def test_pooled_head_scores_from_the_final_states_equal_the_full_forward(tiny_model_dir):
    """top_layers = 0: the cached rows are the pooled layers' states and the last final state,
    and only the head runs."""
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained_lm(tiny_model_dir, dtype="float32", device="cpu", head="pooled", pool_depths=(0.0, 0.5))
    assert rm.pool_layers == (0, 1)  # the embeddings and layer 1 of the tiny model's 2
    items = encode_comparisons(rm.tokenizer, strict_comparisons([3, 4], seed=5), max_response_length=32)
    batch, *_ = comparison_batch(items, rm.tokenizer.pad_token_id, None)
    rm.eval()
    with torch.no_grad():
        full = rm(batch.input_ids, batch.attention_mask, batch.response_mask)
        rows = rm.trunk_rows(batch.input_ids, batch.attention_mask, top_layers=0)
        assert [len(r) for r in rows] == (batch.attention_mask.sum(dim=1) + 1).tolist()
        head_only = rm.scores_from_trunk(rows, [len(ids) for item in items for ids in item.completion_ids], 0)
    torch.testing.assert_close(head_only, full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="response_mask"):
        rm(batch.input_ids, batch.attention_mask)


@pytest.mark.parametrize("epochs", [1, 3])
def test_cached_trunk_trains_the_same_model(tiny_model_dir, tmp_path, epochs):
    """cache_trunk is an optimisation only: same losses, same weights, fewer trunk passes."""
    comparisons, results, weights = marker_comparisons(12, seed=4), {}, {}
    for cached in (True, False):
        config = fast_config(epochs=epochs, train_mode="top_layers", head="last_token", top_layers=1, cache_trunk=cached)
        results[cached] = train_reward_model(tiny_model_dir, comparisons, [], config, tmp_path / str(cached))
        weights[cached] = _layer_weights(tmp_path / str(cached))
    assert results[True].trunk_cached and not results[False].trunk_cached
    for a, b in zip(results[True].epochs, results[False].epochs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    torch.testing.assert_close(weights[True]["layers.1.mlp.up_proj.weight"],
                               weights[False]["layers.1.mlp.up_proj.weight"], rtol=0, atol=1e-5)
    assert results[True].forward_passes == 12 * 4  # each completion through the trunk once
    assert results[False].forward_passes == epochs * 12 * 4


def test_trunk_is_not_cached_with_dropout_or_other_modes(tiny_model_dir, tmp_path):
    for overrides in ({"train_mode": "top_layers", "head": "last_token", "residual_dropout": 0.1}, {"train_mode": "full"}):
        result = train_reward_model(tiny_model_dir, strict_comparisons([4]), [], fast_config(epochs=1, **overrides),
                                    tmp_path / overrides["train_mode"])
        assert not result.trunk_cached


def test_lora_mode_merges_into_a_plain_backbone(tiny_model_dir, tmp_path):
    result = train_reward_model(tiny_model_dir, strict_comparisons([4, 4]), [],
                                fast_config(epochs=1, train_mode="lora", lora_r=4), tmp_path / "rm")
    weights = _layer_weights(tmp_path / "rm")
    assert not any("lora" in name for name in weights)
    base = _layer_weights(tiny_model_dir)
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], weights["layers.0.self_attn.q_proj.weight"])
    rm = RewardModel.load(tmp_path / "rm", device="cpu")
    assert all(p.requires_grad for p in rm.parameters())
    assert result.trainable_params < 0.1 * result.total_params


# ---------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("field, value", [
    ("train_mode", "frozen"), ("top_layers", -1), ("lora_r", 0), ("epochs", 0), ("learning_rate", 0.0),
    ("max_completions_per_step", 1), ("batch_size", 0), ("max_response_length", 512), ("device", "tpu"),
    ("warmup_ratio", 1.0), ("max_grad_norm", 0.0), ("pool_depths", (0.4, 1.5)), ("pool_depths", ()),
])
def test_rm_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RMConfig(**{field: value})


def test_rm_config_defaults_are_the_measured_cpu_recipe():
    """bench.reward_curve chose a pooled head on the frozen, cached trunk reading the token
    embeddings and layer 12 of 30 (nothing above: the trunk is cut there), an ensemble of 5 heads
    at a constant learning rate (docs/BENCHMARKS.md)."""
    config = RMConfig()
    assert (config.train_mode, config.head, config.cache_trunk) == ("head", "pooled", True)
    assert (config.head_ensemble, config.min_lr_ratio, config.pool_depths) == (5, 1.0, (0.0, 0.4))
    assert config.head_last_state is False  # the trunk runs up to layer 12 only


def test_pool_depths_come_from_a_list_in_a_file_or_a_set_override():
    from trainer.config import config_from_overrides

    assert config_from_overrides(RMConfig, ["pool_depths=[0.4]"]).pool_depths == (0.4,)
    assert config_from_overrides(RMConfig, ["pool_depths=[0, 0.5, 1]"]).pool_depths == (0.0, 0.5, 1.0)


def test_jsonl_formats_parse_to_comparisons():
    from trainer.cli import comparison_from_row

    kway = comparison_from_row({"prompt": "q", "completions": ["a", "b", "c", "d"], "ranking": [[2], [0, 3], [1]],
                                "labeler_group": "g1"})
    assert kway.ranks == (1, 2, 0, 1) and kway.labeler_group == "g1"
    assert kway.messages == user_turn("q")
    pair = comparison_from_row({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert pair.completions == ("good", "bad") and pair.ranks == (0, 1)
    chat = comparison_from_row({"prompt": [{"role": "user", "content": "q"}],
                                "chosen": [{"role": "assistant", "content": "good"}],
                                "rejected": [{"role": "assistant", "content": "bad"}]})
    assert chat.completions == ("good", "bad")
    exported = comparison_from_row({"prompt": {"id": "p1", "text": "q", "messages": None},
                                    "completions": [{"id": "c0", "text": "x"}, {"id": "c1", "text": "y"}],
                                    "ranking": [["c1"], ["c0"]]})
    assert exported.ranks == (1, 0) and exported.prompt_id == "p1"
    with pytest.raises(ValueError, match="every completion"):
        comparison_from_row({"prompt": "q", "completions": ["a", "b"], "ranking": [[0]]})


def test_cli_trains_an_rm_from_pairwise_jsonl(tiny_model_dir, tmp_path):
    from trainer.cli import main

    rows = [{"prompt": f"q{i}", "chosen": f"{MARKER} {WORDS[i]}", "rejected": WORDS[i + 1]} for i in range(10)]
    rankings = tmp_path / "pairs.jsonl"
    rankings.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    code = main(["rm", "--model", str(tiny_model_dir), "--rankings", str(rankings), "--out", str(out),
                 "--set", "num_threads=1", "--set", "show_progress=false", "--set", "batch_size=4"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["batch_size"] == 4
    assert metrics["result"]["num_train"] == 9 and metrics["result"]["num_val"] == 1
    assert metrics["result"]["forward_passes"] == 18  # 9 pairs, K = 2
    RewardModel.load(out, device="cpu")
