"""PPO-ptx (trainer.ppo): the recipe's pieces on a hand-checkable batch, learning on the tiny
model, the pretraining mix against the alignment tax, and one iteration on SmolLM2-135M.

The tiny world (built once per module; single-thread CPU time measured here: pretraining
and the RM probe ~35 s, each 12-iteration PPO run ~21 s, each fresh-sample evaluation ~6 s):
- SFT policy = the tiny random Llama pretrained for a few dozen steps on the shipped corpus,
  so it writes corpus-like word salad (function words ~20% of tokens) and has a held-out
  NLL worth protecting.
- RM = a real ``RewardModel`` on that policy's backbone whose head is a linear probe
  (closed-form ridge regression on corpus hidden states) for "this token is one of
  , . the of and a". The RM reads the last token, so it prefers responses that END in a
  function word: ~20% of the SFT policy's samples do, so the signal is there from the start.
- PPO samples two-token responses, so the choice of the last token IS the reward.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from torch.testing import assert_close

from common.checkpoints import ADAPTER_FILES, adapter_record, init_v0, write_checkpoint
from common.models import load_causal_lm, load_tokenizer
from trainer.config import PPOConfig
from trainer.corpus import PtxBatcher, load_corpus, split_corpus
from trainer.evaluate import ptx_eval_loss
from trainer.examples import PromptExample, user_turn
from trainer.losses import kl_penalized_rewards, ptx_loss
from trainer.ppo import (
    Experience,
    PPOResult,
    autocast,
    build_optimizers,
    compute_advantages,
    evaluate_rollouts,
    load_models,
    ppo_minibatch_step,
    rollout_batch,
    score_rollouts,
    sequence_kl,
    token_logprobs,
    train_ppo,
)
from trainer.reward_model import RewardModel
from trainer.rollout import HFRolloutGenerator, Rollouts

FUNCTION_WORDS = (",", "Ġthe", "Ġof", ".", "Ġand", "Ġa")  # byte-level BPE spellings
PROMPTS = [PromptExample(f"p{i}", user_turn(text)) for i, text in enumerate([
    "Tell me about rivers.", "How do I bake bread?", "What is a volcano?", "Describe a forest.",
    "Why is the sky blue?", "How do bees live?", "What happened in the old city?", "Explain how magnets work.",
])]
CPU = torch.device("cpu")

# The two learning runs differ ONLY in ptx_coef.
# Two-token responses: the RM reads the last token, so the policy's choice there IS the
# reward (a contextual bandit with little credit-assignment noise), and rollouts are cheap.
PPO_TEST_CONFIG = dict(
    rollouts_per_iteration=32, iterations=12, max_new_tokens=2, ppo_epochs=1, minibatch_size=16,
    policy_lr=3e-3, value_lr=1e-3, kl_coef=0.05, ptx_batch_size=2, ptx_seq_len=32, seed=0, device="cpu",
)
PTX_COEF = PPOConfig().ptx_coef  # the shipped coefficient (0.3), not one tuned for this test
EVAL_SAMPLES_PER_PROMPT = 8
EVAL_SEED = 1234  # fresh samples: a seed no training rollout used


# ---------------------------------------------------------------------------- the tiny world


def pretrain_on_corpus(model_dir: Path, out_dir: Path, texts: list[str], *, steps: int, seed: int) -> Path:
    """A few AdamW steps of next-token prediction on ``texts`` (the tiny 'SFT' model)."""
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    model = load_causal_lm(model_dir, dtype=torch.float32, device=CPU)
    batches = PtxBatcher(tokenizer, texts, batch_size=8, seq_len=48, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(steps):
        batch = batches.next_batch()
        loss = ptx_loss(model(input_ids=batch.input_ids).logits, batch.labels, batch.mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def fit_function_word_rm(sft_dir: Path, out_dir: Path, texts: list[str], seed: int) -> Path:
    """A RewardModel whose head is a ridge probe for 'the token here is a function word'."""
    rm = RewardModel.from_pretrained_lm(sft_dir, dtype=torch.float32, device=CPU)
    tokenizer = rm.tokenizer
    targets = torch.tensor(tokenizer.convert_tokens_to_ids(list(FUNCTION_WORDS)))
    batch = PtxBatcher(tokenizer, texts, batch_size=8, seq_len=64, seed=seed + 1).next_batch()
    with torch.no_grad():
        hidden = rm.hidden_states(batch.input_ids, batch.attention_mask).flatten(0, 1)  # (N, H)
    labels = torch.isin(batch.input_ids.flatten(), targets).float()  # (N,)
    features = torch.cat([hidden, torch.ones(len(hidden), 1)], dim=1)  # (N, H + 1)
    # ridge: w = (X^T X + lambda I)^-1 X^T y
    w = torch.linalg.solve(features.T @ features + 1e-2 * torch.eye(features.shape[1]), features.T @ labels)
    with torch.no_grad():
        rm.head.linear.weight.copy_(w[:-1].unsqueeze(0))
        rm.head.linear.bias.fill_(float(w[-1]))
    rm.save(out_dir)
    return out_dir


@dataclass
class TinyWorld:
    sft_dir: Path
    rm_dir: Path
    train_texts: list[str]
    held_out_texts: list[str]


def build_tiny_world(root: Path, tiny_model_dir: Path, seed: int = 0) -> TinyWorld:
    train, held_out = split_corpus(load_corpus(), held_out_fraction=0.1, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sft_dir = pretrain_on_corpus(tiny_model_dir, root / "sft", train, steps=30, seed=seed)
        rm_dir = fit_function_word_rm(sft_dir, root / "rm", train, seed=seed)
    return TinyWorld(sft_dir, rm_dir, train, held_out)


@dataclass
class FreshSamples:
    """Statistics of new samples from a policy (never seen in training)."""

    rm_score: float  # mean RM score
    kl_ref: float  # mean per-sequence sum of log pi - log pi_ref on the sampled tokens (nats)
    heldout_nll: float  # token NLL of the held-out corpus slice (the alignment tax)


def fresh_samples(policy_dir: Path, world: TinyWorld, *, max_new_tokens: int) -> FreshSamples:
    tokenizer = load_tokenizer(policy_dir, padding_side="right")
    policy = load_causal_lm(policy_dir, dtype=torch.float32, device=CPU)
    reference = load_causal_lm(world.sft_dir, dtype=torch.float32, device=CPU)
    rm = RewardModel.load(world.rm_dir, dtype=torch.float32, device=CPU)
    prompts = [p for p in PROMPTS for _ in range(EVAL_SAMPLES_PER_PROMPT)]
    rollouts = HFRolloutGenerator(policy, tokenizer).generate(prompts, max_new_tokens=max_new_tokens, seed=EVAL_SEED)
    batch = rollout_batch(rollouts, tokenizer.pad_token_id)
    mask = batch.response_mask[:, 1:]
    with torch.no_grad():
        scores = rm(batch.input_ids, batch.attention_mask, batch.response_mask)
        kl = ((token_logprobs(policy, batch.input_ids, batch.attention_mask)
               - token_logprobs(reference, batch.input_ids, batch.attention_mask)) * mask).sum(dim=1)
    nll = ptx_eval_loss(policy, tokenizer, world.held_out_texts, max_length=64)
    return FreshSamples(float(scores.mean()), float(kl.mean()), nll)


@dataclass
class LearningRuns:
    before: FreshSamples
    plain: FreshSamples  # ptx_coef = 0
    ptx: FreshSamples  # ptx_coef = PTX_COEF
    plain_history: list[dict]
    ptx_history: list[dict]


def run_learning_pair(root: Path, world: TinyWorld, seed: int = 0) -> LearningRuns:
    """The same PPO run twice from the same SFT model: without and with the pretraining mix."""
    before = fresh_samples(world.sft_dir, world, max_new_tokens=PPO_TEST_CONFIG["max_new_tokens"])
    results = {}
    for name, coef in (("plain", 0.0), ("ptx", PTX_COEF)):
        config = PPOConfig(**{**PPO_TEST_CONFIG, "seed": seed}, ptx_coef=coef)
        results[name] = train_ppo(world.sft_dir, world.sft_dir, world.rm_dir, PROMPTS, config, root / name,
                                  corpus_texts=world.train_texts, progress=False)
    after = {name: fresh_samples(root / name, world, max_new_tokens=config.max_new_tokens) for name in results}
    return LearningRuns(before, after["plain"], after["ptx"], results["plain"].history, results["ptx"].history)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"), tiny_model_dir)


@pytest.fixture(scope="module")
def learning_runs(tmp_path_factory: pytest.TempPathFactory, tiny_world: TinyWorld) -> LearningRuns:
    return run_learning_pair(tmp_path_factory.mktemp("ppo_runs"), tiny_world)


# ---------------------------------------------------------------------------- the corpus


def test_shipped_corpus_is_our_own_cc0_text_of_the_promised_size():
    documents = load_corpus()
    assert 100_000 <= sum(len(d) for d in documents) <= 300_000
    assert len(documents) >= 150 and all(len(d) > 200 for d in documents)
    readme = (Path(__file__).resolve().parent.parent / "trainer" / "corpus" / "README.md").read_text()
    assert "CC0" in readme and "original" in readme


def test_split_corpus_is_a_seeded_partition():
    texts = [f"doc {i}" for i in range(20)]
    train, held = split_corpus(texts, held_out_fraction=0.1, seed=3)
    assert len(held) == 2 and sorted(train + held) == sorted(texts)
    assert split_corpus(texts, 0.1, seed=3) == (train, held) != split_corpus(texts, 0.1, seed=4)
    assert split_corpus(["a", "b"], 0.01, seed=0)[1] != []  # at least one held out
    with pytest.raises(ValueError):
        split_corpus(texts, 1.0)


def test_ptx_batches_are_fixed_size_shifted_windows(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = PtxBatcher(tokenizer, load_corpus()[:10], batch_size=3, seq_len=16, seed=0).next_batch()
    assert batch.input_ids.shape == batch.labels.shape == batch.mask.shape == (3, 16)
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])  # labels = inputs shifted by one
    assert batch.mask.sum() == 3 * 16  # packed: no padding
    again = PtxBatcher(tokenizer, load_corpus()[:10], batch_size=3, seq_len=16, seed=0).next_batch()
    assert torch.equal(batch.input_ids, again.input_ids)
    # A corpus shorter than one window gives a right-padded window with mask 0 on the padding.
    short = PtxBatcher(tokenizer, ["Rivers flow."], batch_size=2, seq_len=32).next_batch()
    n = int(short.mask[0].sum())
    assert 0 < n < 32 and short.mask[0, n:].sum() == 0 and short.attention_mask[0, n + 1:].sum() == 0


# ---------------------------------------------------------------------------- config


def test_config_defaults_validate_and_reject_bad_values():
    config = PPOConfig()
    assert config.resolved_policy_lr == 2e-5 and PPOConfig(train_mode="lora").resolved_policy_lr == 2e-4
    assert all(f.metadata.get("help") for f in dataclasses.fields(PPOConfig))
    for bad in ({"kl_control": "pid"}, {"train_mode": "qlora"}, {"temperature": 0.0}, {"clip_eps": 0.0},
                {"minibatch_size": 0}, {"ptx_coef": -1.0}, {"top_p": 1.5}, {"lora_targets": ()}):
        with pytest.raises(ValueError):
            PPOConfig(**bad)


# ---------------------------------------------------------------------------- pieces on a 2-row batch


def toy_rollouts(tokenizer) -> Rollouts:
    """Row 0: 3-token prompt, response 'a b EOS' (stopped). Row 1: 5-token prompt, 2 tokens, cut."""
    eos = tokenizer.eos_token_id
    return Rollouts(prompts=PROMPTS[:2], prompt_ids=[[10, 11, 12], [20, 21, 22, 23, 24]],
                    response_ids=[[30, 31, eos], [40, 41]], texts=["", ""], eos_token_id=eos)


@pytest.mark.parametrize("head", ["last_token", "pooled"])
def test_recipe_pieces_compose_on_a_two_row_batch(tmp_path: Path, tiny_model_dir: Path, head: str):
    rm_dir = RewardModel.from_pretrained_lm(tiny_model_dir, dtype=torch.float32, device=CPU, head=head).save(
        tmp_path / "rm")
    config = PPOConfig(minibatch_size=2, ptx_coef=1.0, ptx_seq_len=8, ptx_batch_size=1, policy_lr=1e-3, device="cpu",
                       kl_coef=0.05)
    models = load_models(tiny_model_dir, tiny_model_dir, rm_dir, config, CPU, torch.float32)
    rollouts = toy_rollouts(models.tokenizer)
    batch = rollout_batch(rollouts, models.tokenizer.pad_token_id)  # (2, 6): widths 6 and 7 -> T = 7
    assert batch.input_ids.shape == (2, 7)

    scores = score_rollouts(models.reward_model, batch, chunk_size=1)
    # The score is the value head read at each row's LAST real token (index 5 and 6).
    with torch.no_grad():
        values = models.reward_model.per_token_values(batch.input_ids, batch.attention_mask,
                                                      batch.response_mask)  # (2, 7)
    assert_close(scores, torch.stack([values[0, 5], values[1, 6]]))

    experience = evaluate_rollouts(models, batch, scores, temperature=1.0, chunk_size=1)
    # Label grid (2, 6): column t predicts token t + 1. Row 0's response tokens sit at 3, 4, 5
    # -> grid columns 2, 3, 4; row 1's at 5, 6 -> grid columns 4, 5.
    assert experience.mask.tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    # The LM head ran only from column 2 on; the values equal a plain full forward there.
    with torch.no_grad():
        logits = models.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert_close(experience.old_logprobs, full * experience.mask, atol=1e-5, rtol=1e-5)
    # Policy == reference at the start: zero KL, so the reward is the score alone, on the last response token.
    assert_close(experience.ref_logprobs, experience.old_logprobs)
    for estimator in ("k1", "k2", "k3"):
        assert_close(sequence_kl(experience, estimator), torch.zeros(2))
    rewards = kl_penalized_rewards(scores, experience.old_logprobs, experience.ref_logprobs, experience.mask, 0.05)
    expected = torch.zeros(2, 6)
    expected[0, 4], expected[1, 5] = scores[0], scores[1]
    assert_close(rewards, expected)
    # gamma = lam = 1, one reward at the end and V = 0 after it: A_t = score - V(s_t), R_t = score.
    advantages, returns = compute_advantages(experience.old_values, rewards, experience.mask, gamma=1.0, lam=1.0,
                                             whiten=False)
    assert_close(advantages, (scores[:, None] - experience.old_values) * experience.mask)
    assert_close(returns, scores[:, None] * experience.mask)

    # First minibatch step: new log-probs equal the old ones, so ratio = 1, nothing clipped.
    experience = dataclasses.replace(experience, rewards=rewards, advantages=advantages, returns=returns)
    before = [p.detach().clone() for p in models.policy.parameters()]
    ptx = PtxBatcher(models.tokenizer, ["A short text about rivers and the sea."], 1, 8).next_batch()
    stats = ppo_minibatch_step(models, build_optimizers(models, config), experience.select(torch.arange(2)), ptx,
                               config)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["value_clip_frac"] == 0.0
    assert math.isfinite(stats["ptx_loss"]) and stats["ptx_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, models.policy.parameters()))


def test_experience_select_trims_padding_columns():
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)  # grid (2, 4)
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    grid = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    exp = Experience(torch.zeros(2, 5, dtype=torch.long), attention, mask, grid, grid, grid, grid, torch.ones(2))
    row0 = exp.select(torch.tensor([0]))
    assert row0.input_ids.shape == (1, 3) and row0.mask.tolist() == [[0.0, 1.0]]
    assert row0.old_logprobs.tolist() == [[0.0, 1.0]] and row0.rewards is None
    assert exp.select(torch.tensor([1, 0])).mask.shape == (2, 4)


# ---------------------------------------------------------------------------- learning on the tiny model


def test_ppo_raises_rm_score_of_fresh_samples_with_bounded_kl(learning_runs: LearningRuns):
    before, after = learning_runs.before, learning_runs.plain
    gain = after.rm_score - before.rm_score
    assert gain > 0.1, (before, after)  # measured over seeds 0, 1, 2: 0.31, 0.17, 0.44
    # Bound: PPO maximises E[score] - beta * KL(pi || pi_ref), which is E_ref[score] at the
    # start (KL = 0). If it improved that objective, then beta * KL <= score gain, i.e.
    # KL <= gain / beta: the policy bought no more divergence than its reward gain pays for.
    # Measured (world seed = PPO seed = 0, 1, 2): gain 0.31 / 0.17 / 0.44, KL 2.8 / 1.6 / 3.5
    # nats, bound 6.2 / 3.4 / 8.8.
    beta = PPO_TEST_CONFIG["kl_coef"]
    assert 0 <= after.kl_ref <= gain / beta, (gain, after.kl_ref)
    for stats in learning_runs.plain_history:
        assert all(math.isfinite(v) for v in (stats["rm_score"], stats["kl_ref"], stats["value_loss"]))


RLOO_TEST_CONFIG = {**PPO_TEST_CONFIG, "advantage_estimator": "rloo", "samples_per_prompt": 4, "ptx_coef": 0.0}


def test_rloo_advantages_learn_without_a_value_model(tmp_path: Path, tiny_world: TinyWorld, learning_runs: LearningRuns):
    """The same run as the plain one above (32 rollouts per iteration: 8 prompts x 4 responses),
    advantages against each prompt's other responses: it learns, within the same KL bound,
    and the value model neither runs nor trains."""
    before = learning_runs.before
    result = train_ppo(tiny_world.sft_dir, tiny_world.sft_dir, tiny_world.rm_dir, PROMPTS,
                       PPOConfig(**RLOO_TEST_CONFIG), tmp_path / "rloo", progress=False)
    after = fresh_samples(tmp_path / "rloo", tiny_world, max_new_tokens=PPO_TEST_CONFIG["max_new_tokens"])
    gain = after.rm_score - before.rm_score
    # Measured (PPO seed 0, 1, 2 on the seed-0 world): gain 0.60 / 0.57 / 0.63, KL 3.1 / 2.8 /
    # 3.7 nats, bound 12.0 / 11.3 / 12.7 (GAE on the same world, seed 0: gain 0.31).
    assert gain > 0.3, (before, after)
    assert 0 <= after.kl_ref <= gain / RLOO_TEST_CONFIG["kl_coef"], (gain, after.kl_ref)
    assert all("value_loss" not in stats for stats in result.history)


def test_config_groups_responses_per_prompt():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PPOConfig(advantage_estimator="rloo")  # one response per prompt has no leave-one-out baseline
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        PPOConfig(rollouts_per_iteration=10, samples_per_prompt=4)
    assert PPOConfig(rollouts_per_iteration=12, samples_per_prompt=4, advantage_estimator="rloo").samples_per_prompt == 4


def test_ptx_reduces_the_alignment_tax(learning_runs: LearningRuns):
    before = learning_runs.before.heldout_nll
    tax_plain = learning_runs.plain.heldout_nll - before
    tax_ptx = learning_runs.ptx.heldout_nll - before
    # Measured over seeds 0, 1, 2 (nats/token): plain 2.67 / 1.19 / 2.75, ptx 0.76 / 0.83 / 1.51.
    assert tax_plain > 0, "plain PPO should cost held-out likelihood"
    assert tax_ptx < tax_plain - 0.2, (tax_plain, tax_ptx)
    # It still learns (score gain 0.17 / 0.22 / 0.33 over the same seeds; at ptx_coef 1.0 it was
    # 0.04 / 0.13 / 0.09 on this torch, too slow for a bound: the test uses the shipped 0.3).
    assert learning_runs.ptx.rm_score > learning_runs.before.rm_score + 0.05
    assert all(s["ptx_loss"] is not None for s in learning_runs.ptx_history)
    assert all(s["ptx_loss"] is None for s in learning_runs.plain_history)


def test_lora_mode_trains_adapters_and_saves_merged_weights(tmp_path: Path, tiny_world: TinyWorld):
    config = PPOConfig(**{**PPO_TEST_CONFIG, "iterations": 1, "rollouts_per_iteration": 8, "ppo_epochs": 1},
                       ptx_coef=1.0, train_mode="lora", lora_r=4, lora_alpha=8)
    result = train_ppo(tiny_world.sft_dir, tiny_world.sft_dir, tiny_world.rm_dir, PROMPTS, config, tmp_path / "out",
                       corpus_texts=tiny_world.train_texts, progress=False)
    assert result.policy_trainable_params < 100_000  # adapters only (the model has ~6.6M weights)
    saved = load_causal_lm(tmp_path / "out", dtype=torch.float32, device=CPU)
    base = load_causal_lm(tiny_world.sft_dir, dtype=torch.float32, device=CPU)
    assert not any("lora" in name for name, _ in saved.named_parameters())
    changed = [n for (n, a), (_, b) in zip(saved.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert changed and all("proj" in n for n in changed)


def test_top_layers_mode_trains_only_the_top_layers_and_learns(tmp_path: Path, tiny_world: TinyWorld,
                                                             learning_runs: LearningRuns):
    """train_mode "top_layers": the plain learning run above with only the tiny model's top
    decoder layer (of 2) and its final norm trained. The rest of the saved policy is the start's,
    bit for bit, and it still learns."""
    config = PPOConfig(**PPO_TEST_CONFIG, ptx_coef=0.0, train_mode="top_layers", top_layers=1)
    result = train_ppo(tiny_world.sft_dir, tiny_world.sft_dir, tiny_world.rm_dir, PROMPTS, config, tmp_path / "out",
                       progress=False)
    saved = dict(load_causal_lm(tmp_path / "out", dtype=torch.float32, device=CPU).named_parameters())
    start = dict(load_causal_lm(tiny_world.sft_dir, dtype=torch.float32, device=CPU).named_parameters())
    changed = {name for name in start if not torch.equal(saved[name], start[name])}
    trainable = {name for name in start if name.startswith(("model.layers.1.", "model.norm."))}
    assert changed and changed <= trainable, sorted(changed - trainable)
    assert result.policy_trainable_params == sum(start[name].numel() for name in trainable)
    after = fresh_samples(tmp_path / "out", tiny_world, max_new_tokens=PPO_TEST_CONFIG["max_new_tokens"])
    gain = after.rm_score - learning_runs.before.rm_score
    # Measured (PPO seed 0, 1, 2 on the seed-0 world): gain 0.18 / 0.23 / 0.16, KL 1.3 / 1.4 / 1.1 nats
    # (every weight trained: gain 0.31 / 0.17 / 0.44).
    assert gain > 0.1, (learning_runs.before, after)
    assert 0 <= after.kl_ref <= gain / config.kl_coef, (gain, after.kl_ref)
    with pytest.raises(ValueError, match="top_layers"):
        PPOConfig(train_mode="top_layers", top_layers=0)


def test_bf16_on_cpu_autocasts_the_trained_models_and_trains(tmp_path: Path, tiny_world: TinyWorld):
    """dtype = "bfloat16" on a CPU: the trained models' forwards run under bf16 autocast (fp32 or
    fp16 there: none), the frozen ones in bf16, and a PPO iteration gives finite figures."""
    def models_in(dtype: torch.dtype) -> SimpleNamespace:
        return SimpleNamespace(device=CPU, autocast_dtype=dtype)

    x = torch.ones(2, 2)
    with autocast(models_in(torch.bfloat16)):
        assert (x @ x).dtype == torch.bfloat16
    for dtype in (torch.float32, torch.float16):
        with autocast(models_in(dtype)):
            assert (x @ x).dtype == torch.float32
    config = PPOConfig(**{**PPO_TEST_CONFIG, "iterations": 1, "rollouts_per_iteration": 8}, dtype="bfloat16")
    result = train_ppo(tiny_world.sft_dir, tiny_world.sft_dir, tiny_world.rm_dir, PROMPTS, config, tmp_path / "out",
                       corpus_texts=tiny_world.train_texts, progress=False)
    stats = result.history[0]
    assert all(math.isfinite(stats[k]) for k in ("rm_score", "kl_ref", "policy_loss", "value_loss", "ptx_loss"))
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as saved:
        assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {"F32"}  # fp32 weights, saved so


# ---------------------------------------------------------------------------- LoRA adapters on the SFT reference

# One iteration of 4 two-token rollouts: enough to move the adapters, about a second on CPU.
ADAPTER_TEST_CONFIG = dict(
    rollouts_per_iteration=4, iterations=1, max_new_tokens=2, ppo_epochs=1, minibatch_size=4, policy_lr=1e-2,
    ptx_coef=0.0, seed=0, device="cpu", num_threads=1, lora_r=4, lora_alpha=8,
)
TOKENS = torch.tensor([[1, 50, 200, 300, 400, 17]])  # any ids of the tiny vocabulary


@dataclass
class Published:
    """A checkpoint root whose v0 (the tiny model) is the SFT reference, and an RM on it."""

    root: Path
    base: Path
    rm_dir: Path


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Published:
    tmp = tmp_path_factory.mktemp("published")
    base = init_v0(tmp / "checkpoints", tiny_model_dir, "tiny-llama")
    rm_dir = RewardModel.from_pretrained_lm(base, dtype=torch.float32, device=CPU).save(tmp / "rm")
    return Published(tmp / "checkpoints", base, rm_dir)


def small_ppo(start: Path, world: Published, out_dir: Path, train_mode: str = "lora") -> PPOResult:
    config = PPOConfig(**ADAPTER_TEST_CONFIG, train_mode=train_mode)
    return train_ppo(start, world.base, world.rm_dir, PROMPTS[:4], config, out_dir, progress=False)


def publish_with_adapter(world: Published, version: int, model_dir: Path) -> Path:
    """``model_dir`` (a PPO output holding adapter/) as checkpoint ``version``, adapters on v0."""
    return write_checkpoint(world.root, version, lambda d: shutil.copytree(model_dir, d, dirs_exist_ok=True),
                            parent_version=0, cycle_id=version, base_model="tiny-llama",
                            adapter=adapter_record(world.base))


def merged_adapter(base: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of ``base`` with the adapters in ``adapter_dir`` merged in, as a server would get them."""
    model = PeftModel.from_pretrained(load_causal_lm(base, dtype=torch.float32, device=CPU), adapter_dir)
    return model.merge_and_unload().state_dict()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits  # (1, 6, V)


def test_lora_ppo_from_the_reference_publishes_adapters_that_merge_to_the_policy(
        tmp_path: Path, published: Published, one_torch_thread):
    result = small_ppo(published.base, published, tmp_path / "out")

    assert result.adapter_base_dir == str(published.base)
    assert all((tmp_path / "out" / "adapter" / name).is_file() for name in ADAPTER_FILES)
    saved = load_causal_lm(tmp_path / "out", dtype=torch.float32, device=CPU).state_dict()
    merged = merged_adapter(published.base, tmp_path / "out" / "adapter")
    assert merged.keys() == saved.keys()
    for name in saved:
        assert_close(merged[name], saved[name])
    # The merged folder is the trained policy, not the base: the adapters moved it.
    base = load_causal_lm(published.base, dtype=torch.float32, device=CPU).state_dict()
    assert any(not torch.equal(saved[name], base[name]) for name in saved)


def test_lora_ppo_from_a_checkpoint_with_adapters_on_the_reference_continues_them(
        tmp_path: Path, published: Published, one_torch_thread):
    small_ppo(published.base, published, tmp_path / "first")
    start = publish_with_adapter(published, 1, tmp_path / "first")
    config = PPOConfig(**ADAPTER_TEST_CONFIG, train_mode="lora")

    models = load_models(start, published.base, published.rm_dir, config, CPU, torch.float32)

    # Before any update the policy IS the start checkpoint (base + its saved adapters, not
    # fresh ones), and the reference is the base under it, not a second model.
    assert models.adapter_base_dir == published.base and models.reference is None
    start_logits = logits(load_causal_lm(start, dtype=torch.float32, device=CPU))
    base_logits = logits(load_causal_lm(published.base, dtype=torch.float32, device=CPU))
    assert not torch.allclose(start_logits, base_logits, atol=1e-2)  # the first run moved the policy
    assert_close(logits(models.policy), start_logits, atol=1e-4, rtol=1e-4)  # unmerged vs merged: float error
    with models.policy.disable_adapter():
        assert_close(logits(models.policy), base_logits)
    assert all("lora_" in name for name, p in models.policy.named_parameters() if p.requires_grad)

    result = small_ppo(start, published, tmp_path / "second")
    assert result.adapter_base_dir == str(published.base)
    saved = load_causal_lm(tmp_path / "second", dtype=torch.float32, device=CPU).state_dict()
    merged = merged_adapter(published.base, tmp_path / "second" / "adapter")
    for name in saved:
        assert_close(merged[name], saved[name])


def test_lora_ppo_puts_fresh_adapters_on_a_start_without_usable_ones(
        tmp_path: Path, published: Published, caplog: pytest.LogCaptureFixture, one_torch_thread):
    small_ppo(published.base, published, tmp_path / "first")
    with_adapter = publish_with_adapter(published, 2, tmp_path / "first")
    without = shutil.ignore_patterns("adapter")  # the merged weights alone, as a full-mode run publishes them
    merged_only = write_checkpoint(published.root, 3, lambda d: shutil.copytree(tmp_path / "first", d, ignore=without,
                                                                                dirs_exist_ok=True),
                                   parent_version=0, cycle_id=3, base_model="tiny-llama")
    other_rank = PPOConfig(**{**ADAPTER_TEST_CONFIG, "lora_r": 8}, train_mode="lora")
    same_rank = PPOConfig(**ADAPTER_TEST_CONFIG, train_mode="lora")
    caplog.set_level(logging.INFO, logger="trainer.ppo")

    for start, config, why in ((with_adapter, other_rank, "r 4 != 8"), (merged_only, same_rank, "names no adapters")):
        models = load_models(start, published.base, published.rm_dir, config, CPU, torch.float32)
        # LoRA on the start weights, held to a separate reference: nothing to publish as an adapter.
        assert models.adapter_base_dir is None and models.reference is not None
        assert why in caplog.text
        with models.policy.disable_adapter():
            assert_close(logits(models.policy), logits(load_causal_lm(start, dtype=torch.float32, device=CPU)))


def test_full_mode_writes_no_adapters(tmp_path: Path, published: Published, one_torch_thread):
    result = small_ppo(published.base, published, tmp_path / "out", train_mode="full")
    assert result.adapter_base_dir is None and not (tmp_path / "out" / "adapter").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- SmolLM2-135M


@pytest.mark.slow
def test_one_ppo_ptx_iteration_on_the_embedded_model(tmp_path: Path, embedded_model_dir: Path):
    rm_dir = RewardModel.from_pretrained_lm(embedded_model_dir, dtype=torch.float32, device=CPU).save(tmp_path / "rm")
    config = PPOConfig(rollouts_per_iteration=4, iterations=1, max_new_tokens=16, ppo_epochs=1, minibatch_size=4,
                       ptx_coef=1.0, ptx_batch_size=2, ptx_seq_len=64, device="cpu")
    result = train_ppo(embedded_model_dir, embedded_model_dir, rm_dir, PROMPTS[:4], config, tmp_path / "policy",
                       progress=False)
    (stats,) = result.history
    numbers = [v for k, v in stats.items() if isinstance(v, float)] + list(stats["seconds"].values())
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # one step: new = old log-probs
    saved = load_causal_lm(tmp_path / "policy", dtype=torch.float32, device=CPU)
    base = load_causal_lm(embedded_model_dir, dtype=torch.float32, device=CPU)
    assert any(not torch.equal(a, b) for a, b in zip(saved.parameters(), base.parameters()))
    tokenizer = load_tokenizer(tmp_path / "policy")
    texts = HFRolloutGenerator(saved, tokenizer).generate(PROMPTS[:1], max_new_tokens=4, temperature=0.0).texts
    assert isinstance(texts[0], str)
