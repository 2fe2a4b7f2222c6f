"""SFT: learning, checkpoint selection, residual dropout, schedule, config, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.models import load_causal_lm, load_tokenizer
from trainer.config import SFTConfig, config_from_overrides
from trainer.examples import Demonstration, user_turn
from trainer.sft import encode_demonstrations, train_sft, validation_loss
from trainer.torch_parts import build_optimizer, cosine_lr_lambda, training_dropout

PHRASE = "The cat sat on the mat."
TOPICS = "rivers stars bread music chess winter bees glass trains clocks maps kites".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def phrase_demos(topics: list[str]) -> list[Demonstration]:
    """Whatever the prompt, the response is the same phrase: learnable in a few steps."""
    return [Demonstration(user_turn(f"Tell me about {t}."), PHRASE) for t in topics]


def fast_config(**overrides) -> SFTConfig:
    base = {"learning_rate": 1e-2, "epochs": 3, "batch_size": 2, "num_threads": 1, "show_progress": False,
            "max_length": 128, "max_response_length": 32, "eval_max_new_tokens": 8}
    return SFTConfig(**{**base, **overrides})


class ScriptedScorer:
    """A stand-in reward model: returns the next scripted mean score at each call."""

    def __init__(self, means: list[float]) -> None:
        self.means = list(means)
        self.calls: list[int] = []

    def score_texts(self, tokenizer, prompts, responses, batch_size=16, stopped=None):
        self.calls.append(len(responses))
        return torch.full((len(responses),), self.means.pop(0))


def test_sft_lowers_validation_loss(tiny_model_dir, tmp_path):
    result = train_sft(tiny_model_dir, phrase_demos(TOPICS[:8]), phrase_demos(TOPICS[8:]), fast_config(),
                       tmp_path / "sft")
    losses = [e["val_loss"] for e in result.epochs]
    # ln(49152) = 10.8 at random init; the fixed phrase is learnt to well under half of that.
    assert losses[-1] < 0.3 * result.initial_val_loss, (result.initial_val_loss, losses)
    assert result.selected_by == "val_loss"
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert (tmp_path / "sft" / "config.json").is_file() and (tmp_path / "sft" / "tokenizer_config.json").is_file()
    json.dumps(result.to_dict())


def test_checkpoint_selection_by_rm_score(tiny_model_dir, tmp_path):
    """RM means 0.1, 0.9, 0.3 by epoch: epoch 2 is kept, whatever the validation loss says."""
    scorer = ScriptedScorer([0.1, 0.9, 0.3])
    val = phrase_demos(TOPICS[8:])
    result = train_sft(tiny_model_dir, phrase_demos(TOPICS[:4]), val, fast_config(), tmp_path / "sft",
                       reward_model=scorer)
    assert result.selected_by == "rm_score"
    assert [e["rm_score"] for e in result.epochs] == pytest.approx([0.1, 0.9, 0.3])
    assert result.best_epoch == 2
    assert [e["selected"] for e in result.epochs] == [True, True, False]
    assert scorer.calls == [4, 4, 4]  # greedy samples on the 4 validation prompts, each epoch
    # The saved weights are epoch 2's: their validation loss is epoch 2's, not epoch 3's.
    saved = load_causal_lm(tmp_path / "sft", dtype="float32", device="cpu")
    tok = load_tokenizer(tmp_path / "sft", padding_side="right")
    loss = validation_loss(saved, encode_demonstrations(tok, val, 32), tok.pad_token_id, 128, 8)
    assert loss == pytest.approx(result.epochs[1]["val_loss"], rel=1e-5)
    assert loss != pytest.approx(result.epochs[2]["val_loss"], rel=1e-5)


def test_residual_dropout_hooks_are_training_only_and_removed(tiny_model_dir):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    ids = torch.randint(0, 1000, (2, 12))

    def logits():
        return model(input_ids=ids).logits

    model.eval()
    reference = logits()
    with training_dropout(model, residual=0.5, attention=0.3):
        attn = model.model.layers[0].self_attn
        assert attn.attention_dropout == 0.3
        model.train()
        assert not torch.allclose(logits(), reference)  # dropout on the residual branches
        model.eval()
        torch.testing.assert_close(logits(), reference)  # eval mode: no dropout
    model.train()
    torch.testing.assert_close(logits(), reference)  # hooks gone, attention dropout restored
    assert attn.attention_dropout == 0.0 and model.config.attention_dropout == 0.0


def test_cosine_schedule_hand_values():
    f = cosine_lr_lambda(warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    # warmup: (step + 1) / 3; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 2) / 8))
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(6) == pytest.approx(0.55)  # halfway: cos(pi / 2) = 0
    assert f(10) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_optimizer_decays_matrices_only():
    layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer, _ = build_optimizer(list(layer.named_parameters()), 1e-3, 0.1, (0.9, 0.95), 10, 0.0, 0.0)
    decays = {p.dim(): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {2: 0.1, 1: 0.0}


@pytest.mark.parametrize("field, value", [
    ("learning_rate", -1.0), ("epochs", 0), ("batch_size", 0), ("micro_batch_size", 99),
    ("residual_dropout", 1.0), ("attention_dropout", -0.1), ("max_response_length", 512),
    ("selection_metric", "bleu"), ("dtype", "int8"), ("min_lr_ratio", 2.0), ("num_threads", 0),
])
def test_sft_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SFTConfig(**{field: value})


def test_config_overrides_are_typed():
    config = config_from_overrides(SFTConfig, ["epochs=2", "learning_rate=1e-4", "micro_batch_size=none",
                                               "selection_metric=val_loss", "show_progress=false"])
    assert (config.epochs, config.learning_rate, config.micro_batch_size) == (2, 1e-4, None)
    assert config.selection_metric == "val_loss" and config.show_progress is False
    with pytest.raises(ValueError, match="Unknown SFTConfig field: epoch"):
        config_from_overrides(SFTConfig, ["epoch=2"])
    with pytest.raises(ValueError, match="epochs"):
        config_from_overrides(SFTConfig, ["epochs=two"])


def test_cli_sft_writes_model_and_metrics(tiny_model_dir, tmp_path):
    from trainer.cli import main

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"About {t}?"},
                                 {"role": "assistant", "content": PHRASE}]}) + "\n" for t in TOPICS))
    out = tmp_path / "sft"
    code = main(["sft", "--model", str(tiny_model_dir), "--demos", str(demos), "--out", str(out),
                 "--set", "epochs=1", "--set", "num_threads=1", "--set", "show_progress=false",
                 "--set", "learning_rate=1e-3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 1
    assert metrics["result"]["num_train"] == 11 and metrics["result"]["num_val"] == 1
    assert (out / "model.safetensors").is_file()


def test_cli_rejects_a_demo_without_an_assistant_turn(tiny_model_dir, tmp_path, capsys):
    from trainer.cli import main

    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["sft", "--model", str(tiny_model_dir), "--demos", str(demos), "--out", str(tmp_path / "o")]) == 2
    assert "assistant" in capsys.readouterr().err


def test_cli_ppo_passes_files_and_overrides_to_train_ppo(tmp_path, monkeypatch):
    """The ppo subcommand's plumbing, with train_ppo stubbed (PPO itself is tested in its own module)."""
    import trainer.ppo
    from trainer.cli import main
    from trainer.examples import PromptExample

    seen = {}

    class Result:
        def to_dict(self):
            return {"iterations_run": seen["config"].iterations}

    def fake_train_ppo(policy_dir, ref_dir, rm_dir, prompts, config, out_dir, corpus_texts=None, **kwargs):
        seen.update(policy=policy_dir, ref=ref_dir, rm=rm_dir, prompts=prompts, config=config, corpus=corpus_texts)
        return Result()

    monkeypatch.setattr(trainer.ppo, "train_ppo", fake_train_ppo)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi", "prompt_id": "p1"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Yo"}]}) + "\n")
    out = tmp_path / "ppo"
    assert main(["ppo", "--policy", "P", "--rm", "R", "--prompts", str(prompts), "--out", str(out),
                 "--set", "iterations=3", "--set", "kl_coef=0.1"]) == 0
    assert (seen["policy"], seen["ref"], seen["rm"], seen["corpus"]) == ("P", "P", "R", None)
    assert seen["prompts"] == [PromptExample("p1", user_turn("Hi")), PromptExample("2", user_turn("Yo"))]
    assert seen["config"].iterations == 3 and seen["config"].kl_coef == 0.1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["result"] == {"iterations_run": 3} and metrics["config"]["kl_coef"] == 0.1
