"""Step 3: PPO-ptx, InstructGPT's RL stage.

A bandit environment: a prompt in, a response out, the frozen reward model's score at the
end, and a per-token KL penalty -beta * log(pi_RL / pi_SFT) against the frozen SFT
reference. PPO-ptx adds gamma * (pretraining log-likelihood) to the objective, which keeps
the policy's language modelling from regressing (the "alignment tax").

``train_ppo`` reads top to bottom; each iteration (``ppo_iteration``) is:

  1. sample prompts                         ``prompt_schedule``
  2. rollout with the CURRENT weights       ``collect_rollouts`` (``samples_per_prompt`` each)
  3. score with the frozen RM               ``score_rollouts``
  4. old log-probs (policy), reference log-probs (frozen SFT), values (trained copy of the
     RM), entropy                           ``evaluate_rollouts``
  5. per-token rewards                      ``trainer.losses.kl_penalized_rewards``
  6. GAE (+ whitening)                      ``compute_advantages``; or, with
     ``advantage_estimator = "rloo"``, each response against the prompt's other responses
     (``trainer.losses.rloo_advantages``: no value model runs or trains)
  7. PPO epochs over minibatches            ``ppo_update`` -> ``ppo_minibatch_step``:
     clipped policy loss + ptx_coef * pretraining NLL, then the clipped value loss
  8. KL controller update

All the math lives in ``trainer.losses``; this module moves tensors between models.

Data-parallel under torchrun (``trainer.distributed``): ``ppo_minibatch_step`` takes this
rank's rows of the minibatch and the trained models as DDP replicas
(``data_parallel_replicas``); every token-level mean is taken over ALL ranks' tokens, so
the update equals one process's on the whole minibatch.

Conventions (``trainer.data``): sequences are right-padded prompt ++ response (EOS
included when the model stopped); every per-token quantity lives on the label grid
(B, T - 1), where column t is the prediction of token t + 1, and ``mask`` is the response
mask shifted by one. A value V(s_t) on that grid is the value of the prefix ending at
token t, i.e. the state in which token t + 1 is chosen.

Normalisation of ptx_coef (gamma): both terms are per-token means. The policy loss is the
masked mean over the minibatch's response tokens of the clipped surrogate (with whitened,
unit-scale advantages) and ``ptx_loss`` is the masked mean NLL over the pretraining
batch's tokens, so gamma = 1 weighs one pretraining token like one RL token, whatever the
batch sizes. The paper's 27.8 is reported without saying how its two terms are
normalised, so it does not transfer. Calibration on SmolLM2-135M (one fixed batch of 8
rollouts x 24 tokens from a brevity RM; from the same weights, the same 4 policy steps at
lr 2e-5 with gradient clip 1.0 for each gamma; tax = change of the held-out corpus NLL,
3.300 before; RL progress = PPO surrogate gain on the batch):

    gamma   tax (nats/token)   RL progress      policy grad norm, step 1
    0       +0.0067            0.475 (100%)     7.45  (ptx grad alone: 5.6-5.9)
    0.3     -0.0112            0.450 (95%)      7.54
    1       -0.0286            0.370 (78%)      9.19
    3       -0.0394            0.232 (49%)      18.8
    27.8    -0.0437            0.042 (9%)       164

The PPO and ptx gradients are nearly orthogonal with norms of the same order (7.5 vs 5.8),
so under clipping gamma sets the share of each step spent on RL: 0.3 is the smallest
measured value that turns the tax negative, and the default.

Precision: frozen models (reference, RM) run in ``dtype`` (bf16 on a CUDA device that
supports it); trained models (policy, value) keep fp32 weights under bf16 autocast there,
since AdamW updates of ~1e-5 relative size vanish in bf16 weights. On CPU everything is fp32
unless ``dtype = "bfloat16"`` asks for the same scheme there (CPU autocast is bf16 only).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.checkpoints import ADAPTER_DIR, CheckpointError, adapter_of
from common.models import load_causal_lm, load_tokenizer, resolve_dtype
from trainer import distributed
from trainer.config import PPOConfig
from trainer.corpus import PtxBatch, PtxBatcher, load_corpus, split_corpus
from trainer.data import SequenceBatch, pack_sequences
from trainer.device import adapt_threads, num_threads, progress_enabled, resolve_device, seed_everything
from trainer.examples import PromptExample
from trainer.lora import add_lora, load_lora, saved_lora_mismatch
from trainer.losses import (
    AdaptiveKLController,
    FixedKLController,
    compute_approx_kl,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ptx_loss,
    response_logprobs,
    rloo_advantages,
    value_loss,
    whiten_from_sums,
)
from trainer.reward_model import RewardModel
from trainer.rollout import HFRolloutGenerator, RolloutGenerator, Rollouts
from trainer.torch_parts import decoder_layers, train_only_top_layers

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- models


@dataclass
class PPOModels:
    """The four networks of PPO-ptx and the shared tokenizer."""

    policy: torch.nn.Module  # causal LM (peft-wrapped in lora mode), trained
    reference: torch.nn.Module | None  # frozen SFT policy; None: the policy with its adapters disabled
    reward_model: RewardModel  # frozen
    value_model: RewardModel  # trained; starts as a copy of the RM (paper)
    tokenizer: Any
    device: torch.device
    autocast_dtype: torch.dtype  # for the trained models' forwards
    adapter_base_dir: Path | None  # the reference folder when the policy's adapters sit on it (else None)


def load_models(policy_dir: Path | str, ref_dir: Path | str, rm_dir: Path | str, config: PPOConfig,
                device: torch.device, dtype: torch.dtype) -> PPOModels:
    """Policy (fp32, trained), reference and RM (``dtype``, frozen), value model (fp32 copy of the RM).
    Which of the trained models' weights train: ``config.train_mode``.

    When the policy's LoRA adapters sit on the reference (``load_lora_policy``), the reference
    is the policy with its adapters disabled, not a second model in memory.
    """
    tokenizer = load_tokenizer(policy_dir, padding_side="right")
    if config.train_mode == "lora":
        policy, adapter_base_dir = load_lora_policy(policy_dir, ref_dir, config, device)
    else:
        policy, adapter_base_dir = load_causal_lm(policy_dir, dtype=torch.float32, device=device), None
    reference = None if adapter_base_dir is not None else freeze(load_causal_lm(ref_dir, dtype=dtype, device=device))
    reward_model = freeze(RewardModel.load(rm_dir, dtype=dtype, device=device))
    check_same_vocabulary(tokenizer, reward_model.tokenizer, rm_dir)
    value_model = copy.deepcopy(reward_model).float()  # on CUDA: from bf16-rounded RM weights
    value_model.requires_grad_(True)
    if config.train_mode == "lora":
        value_model.backbone = add_lora(value_model.backbone, **lora_shape(config))
        value_model.head.requires_grad_(True)
    elif config.train_mode == "top_layers":
        train_only_top_layers(policy, config.top_layers)
        # The value model's trunk may be cut shorter than the policy's (the RM's, at its pooled layer).
        train_only_top_layers(value_model.backbone, min(config.top_layers, len(decoder_layers(value_model.backbone))))
    # Dropout stays off (eval mode) so old and new log-probs come from the same function.
    policy.eval()
    value_model.eval()
    return PPOModels(policy, reference, reward_model, value_model, tokenizer, device, dtype, adapter_base_dir)


def lora_shape(config: PPOConfig) -> dict[str, Any]:
    """``add_lora``'s keyword arguments for the policy's and value model's adapters."""
    return {"r": config.lora_r, "alpha": config.lora_alpha, "targets": config.lora_targets}


def load_lora_policy(policy_dir: Path | str, ref_dir: Path | str, config: PPOConfig,
                     device: torch.device) -> tuple[torch.nn.Module, Path | None]:
    """The policy with trainable LoRA adapters, and ``ref_dir`` when they sit on the reference
    (None: on the start policy's own weights).

    They go on the reference whenever the start policy equals it plus adapters: fresh ones
    when PPO starts from the reference itself, the saved ones (continued) when it starts
    from a checkpoint whose adapters were trained on it. Then the KL reference is the base
    the policy trains on, and the adapters can be published as adapters of that base.
    Otherwise fresh adapters go on the start weights, and none will be published.
    """
    ref_dir = Path(ref_dir)
    if Path(policy_dir).resolve() == ref_dir.resolve():
        base = load_causal_lm(ref_dir, dtype=torch.float32, device=device)
        return add_lora(base, **lora_shape(config), task_type="CAUSAL_LM"), ref_dir
    adapter_dir = saved_adapters_on(policy_dir, ref_dir)
    policy = None if adapter_dir is None else continue_saved_adapters(adapter_dir, ref_dir, config, device)
    if policy is not None:
        return policy, ref_dir
    start = load_causal_lm(policy_dir, dtype=torch.float32, device=device)
    return add_lora(start, **lora_shape(config), task_type="CAUSAL_LM"), None


def saved_adapters_on(policy_dir: Path | str, ref_dir: Path) -> Path | None:
    """The adapters of checkpoint ``policy_dir`` when they were trained on ``ref_dir``; None
    (logged why) when it has none, or none on that base."""
    try:
        saved = adapter_of(Path(policy_dir))
    except CheckpointError as e:
        return _no_adapters_on_reference(policy_dir, str(e))
    if saved is None:
        return _no_adapters_on_reference(policy_dir, "its manifest names no adapters")
    if saved.base_dir.resolve() != ref_dir.resolve():
        return _no_adapters_on_reference(policy_dir, f"its adapters sit on {saved.base_dir}, not on the reference")
    return saved.adapter_dir


def continue_saved_adapters(adapter_dir: Path, ref_dir: Path, config: PPOConfig,
                            device: torch.device) -> torch.nn.Module | None:
    """The reference with the adapters saved in ``adapter_dir``, trainable; None (logged why)
    when they have another rank, alpha or targets than ``config`` asks for."""
    base = load_causal_lm(ref_dir, dtype=torch.float32, device=device)
    mismatch = saved_lora_mismatch(adapter_dir, base, **lora_shape(config))
    if mismatch is not None:
        return _no_adapters_on_reference(adapter_dir.parent, f"its adapters differ from the config: {mismatch}")
    log.info("lora PPO: continuing the adapters in %s on the reference %s", adapter_dir, ref_dir)
    return load_lora(base, adapter_dir)


def _no_adapters_on_reference(policy_dir: Path | str, why: str) -> None:
    log.info("lora PPO: fresh adapters on the weights of %s, none published (%s)", policy_dir, why)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def check_same_vocabulary(policy_tokenizer: Any, rm_tokenizer: Any, rm_dir: Path | str) -> None:
    """The RM reads the policy's token ids directly: their vocabularies must agree."""
    if rm_tokenizer is not None and rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ValueError(f"the reward model in {rm_dir} uses another tokenizer than the policy")


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizers(models: PPOModels, config: PPOConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Constant-LR AdamW for the policy and for the value model (eps 1e-5, as in PPO codebases)."""
    def adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)

    return adamw(models.policy, config.resolved_policy_lr), adamw(models.value_model, config.resolved_value_lr)


def autocast(models: PPOModels) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for the trained fp32 models on CUDA, bf16 on a CPU (``dtype =
    "bfloat16"``: a PPO iteration in 0.70x the fp32 time on this machine's avx512_bf16 cores,
    ``python -m bench.ppo_effect``); a no-op in fp32 (and for fp16 on a CPU)."""
    lower = models.autocast_dtype
    enabled = lower != torch.float32 and (models.device.type == "cuda" or lower == torch.bfloat16)
    return torch.autocast(models.device.type, dtype=lower, enabled=enabled)


def build_kl_controller(config: PPOConfig) -> FixedKLController | AdaptiveKLController:
    if config.kl_control == "fixed":
        return FixedKLController(config.kl_coef)
    if config.kl_control == "adaptive":
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    raise ValueError(f"Unknown kl_control: {config.kl_control}")


def build_ptx_batcher(tokenizer: Any, corpus_texts: Sequence[str] | None, config: PPOConfig) -> PtxBatcher | None:
    """Pretraining batches from ``corpus_texts`` (default: the shipped corpus's train slice); None when ptx is off."""
    if config.ptx_coef == 0:
        return None
    if corpus_texts is None:
        corpus_texts, _held_out = split_corpus(load_corpus(), config.ptx_held_out_fraction, seed=0)
    return PtxBatcher(tokenizer, corpus_texts, config.ptx_batch_size, config.ptx_seq_len, seed=config.seed)


# ---------------------------------------------------------------------------- rollouts


def prompt_schedule(prompts: Sequence[PromptExample], per_iteration: int, seed: int) -> Iterator[list[PromptExample]]:
    """Batches of prompts from a reshuffled order per pass: every prompt is used once per pass."""
    rng = random.Random(seed)
    queue: list[PromptExample] = []
    while True:
        while len(queue) < per_iteration:
            order = list(prompts)
            rng.shuffle(order)
            queue += order
        batch, queue = queue[:per_iteration], queue[per_iteration:]
        yield batch


def collect_rollouts(generator: RolloutGenerator, prompts: Sequence[PromptExample], config: PPOConfig,
                     seed: int) -> Rollouts:
    """One sampled response per prompt from the current policy."""
    return generator.generate(prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              top_p=config.top_p, seed=seed, max_prompt_tokens=config.max_prompt_tokens)


def rollout_batch(rollouts: Rollouts, pad_token_id: int) -> SequenceBatch:
    """Right-padded prompt ++ response ids of the rollouts. Shapes: (B, T)."""
    return pack_sequences(rollouts.prompt_ids, rollouts.response_ids, pad_token_id)


@torch.no_grad()
def score_rollouts(reward_model: RewardModel, batch: SequenceBatch, chunk_size: int) -> torch.Tensor:
    """The frozen RM's score of each sequence, read at its last token. Shape: (B,) float32."""
    chunks = _row_chunks(batch, distributed.row_chunks(len(batch.input_ids), chunk_size))
    scores = [reward_model(ids, mask, response) for ids, mask, response in chunks]
    return torch.cat(scores).float()


def apply_missing_eos_penalty(scores: torch.Tensor, stopped: Sequence[bool], penalty: float | None) -> torch.Tensor:
    """Scores minus ``penalty`` where the response was cut before EOS. Shape: (B,) -> (B,)."""
    if penalty is None:
        return scores
    cut = torch.tensor([not s for s in stopped], dtype=scores.dtype, device=scores.device)
    return scores - penalty * cut


def _row_chunks(batch: SequenceBatch, slices: Sequence[slice]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, response_mask) of each slice of rows (``distributed.row_chunks``)."""
    for rows in slices:
        yield batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows]


# ---------------------------------------------------------------------------- log-probs and values


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False, start: int = 0):
    """log pi(token t+1 | tokens <= t) on the label grid, optionally with the entropy there.

    Shape: input_ids, attention_mask (B, T) -> (B, T-1) float32 [, (B, T-1) float32].
    Only grid columns >= ``start`` are computed (the LM head runs on those positions only,
    via ``logits_to_keep``); earlier columns hold 0. Pass the first response column: the
    prompt's logits are never needed and the head is the costliest layer of small models.
    """
    width = input_ids.shape[1] - 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=input_ids.shape[1] - start).logits[:, :-1, :]  # (B, T-1-start, V)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = _left_pad(response_logprobs(logits, input_ids[:, start + 1:]).float(), width)
    if not with_entropy:
        return logprobs
    return logprobs, _left_pad(entropy_from_logits(logits.float()).float(), width)


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left up to ``width`` columns. Shape: (B, w) -> (B, width)."""
    return torch.nn.functional.pad(x, (width - x.shape[1], 0))


def first_response_column(mask: torch.Tensor) -> int:
    """The first label-grid column where any row has a response token (0 for an empty mask)."""
    return int(mask.argmax(dim=1).min()) if mask.any() else 0


def token_values(value_model: RewardModel | Callable[..., torch.Tensor], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) on the label grid: the value of the prefix ending at token t. Shape: (B, T) -> (B, T-1).
    ``value_model``: the model, or its ``per_token_values`` as a DDP replica (``TrainedReplicas``)."""
    per_token_values = value_model.per_token_values if isinstance(value_model, RewardModel) else value_model
    return per_token_values(input_ids, attention_mask, response_mask)[:, :-1].float()


def response_mask_from_grid(mask: torch.Tensor) -> torch.Tensor:
    """The (B, T) response mask back from its label-grid shift. Shape: (B, T-1) -> (B, T)."""
    return torch.nn.functional.pad(mask, (1, 0))


def reference_logprobs(models: PPOModels, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       temperature: float, start: int = 0) -> torch.Tensor:
    """log pi_SFT on the label grid. Shape: (B, T) -> (B, T-1)."""
    if models.reference is not None:
        return token_logprobs(models.reference, input_ids, attention_mask, temperature, start=start)
    with models.policy.disable_adapter():  # the adapters sit on the reference: the base IS it
        return token_logprobs(models.policy, input_ids, attention_mask, temperature, start=start)


@dataclass
class Experience:
    """One iteration's rollouts with everything PPO needs.

    Shapes: input_ids, attention_mask (B, T); every other per-token tensor (B, T-1) on the
    label grid, 0 where ``mask`` is 0; scores (B,).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Experience:
        """The given rows, with trailing all-padding columns dropped."""
        width = int(self.attention_mask[rows].sum(dim=1).max())
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "scores":
                picked[f.name] = None if value is None else value[rows]
            elif f.name in ("input_ids", "attention_mask"):
                picked[f.name] = value[rows, :width]
            else:
                picked[f.name] = value[rows, : width - 1]
        return Experience(**picked)


@torch.no_grad()
def evaluate_rollouts(models: PPOModels, batch: SequenceBatch, scores: torch.Tensor, temperature: float,
                      chunk_size: int, with_values: bool = True) -> Experience:
    """Old log-probs and entropy (policy), reference log-probs and values (zeros when not
    ``with_values``: advantages that need no value model), in no-grad chunks."""
    parts: dict[str, list[torch.Tensor]] = {"old": [], "entropy": [], "ref": [], "values": []}
    mask = batch.response_mask[:, 1:].to(models.device)  # (B, T-1)
    start = first_response_column(mask)
    # sharded weights: every rank makes the same number of forwards (``distributed.row_chunks``)
    slices = distributed.row_chunks(len(batch.input_ids), chunk_size, models.policy)
    for ids, attn, response in _row_chunks(batch, slices):
        with autocast(models):
            old, entropy = token_logprobs(models.policy, ids, attn, temperature, with_entropy=True, start=start)
            parts["ref"].append(reference_logprobs(models, ids, attn, temperature, start=start))
            parts["values"].append(token_values(models.value_model, ids, attn, response) if with_values
                                   else torch.zeros(ids.shape[0], ids.shape[1] - 1, device=ids.device))
        parts["old"].append(old)
        parts["entropy"].append(entropy)
    old, entropy, ref, values = (torch.cat(parts[k]) * mask for k in ("old", "entropy", "ref", "values"))
    return Experience(batch.input_ids, batch.attention_mask, mask, old, ref, values, entropy, scores)


# ---------------------------------------------------------------------------- advantages


def compute_advantages(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                       lam: float, whiten: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (whitened over all response tokens when asked) and returns.

    Shape: values, rewards, mask (B, T-1) -> two (B, T-1). Returns are computed before
    whitening: they are the value targets.
    """
    advantages, returns = gae(values, rewards, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


# ---------------------------------------------------------------------------- the PPO update


def pretraining_loss(policy: torch.nn.Module, batch: PtxBatch) -> torch.Tensor:
    """Masked mean NLL of a pretraining batch (labels already aligned with the logits). 0-dim."""
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return ptx_loss(logits, batch.labels, batch.mask)


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Clip the gradient norm (when asked), step, clear; returns the norm before clipping."""
    params = trainable_parameters(model)
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # sharded (FSDP2) gradients give a distributed tensor: its value is the whole gradient's norm
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@dataclass
class TrainedReplicas:
    """How a PPO step calls the two trained models when several ranks train
    (``data_parallel_replicas``): each a DDP replica, so their gradients sync across ranks."""

    policy: Callable[..., Any]  # the policy's forward (a causal LM call)
    values: Callable[..., torch.Tensor]  # the value model's ``per_token_values``


def data_parallel_replicas(models: PPOModels) -> TrainedReplicas:
    """The policy and the value model wrapped for DDP (``trainer.distributed.wrap_data_parallel``)."""
    return TrainedReplicas(distributed.wrap_data_parallel(models.policy),
                           distributed.wrap_data_parallel(models.value_model, RewardModel.per_token_values))


def _require_replicas(replicas: TrainedReplicas | None) -> None:
    if replicas is None and distributed.world().distributed:
        raise ValueError("a data-parallel PPO step needs replicas=data_parallel_replicas(models): "
                         "gradients would not sync")


def policy_step(models: PPOModels, optimizer: torch.optim.Optimizer, mb: Experience, ptx_batch: PtxBatch | None,
                *, clip_eps: float, ptx_coef: float, temperature: float, max_grad_norm: float | None,
                replicas: TrainedReplicas | None = None) -> dict[str, float]:
    """loss = clipped PPO surrogate + ptx_coef * pretraining NLL; one optimizer step.

    Data-parallel (``replicas``): ``mb`` and ``ptx_batch`` are this rank's rows of the global
    minibatch. Both terms are means over ALL ranks' tokens: each rank's token mean is scaled
    by W * (its tokens / all tokens, all-reduced) before backward (``distributed.loss_scale``),
    so DDP's average gradient is the single-process one; the statistics are token-weighted
    over the ranks. The surrogate's backward skips the all-reduce when the ptx backward follows.
    """
    _require_replicas(replicas)
    policy = models.policy if replicas is None else replicas.policy
    with_ptx = ptx_batch is not None and ptx_coef > 0
    tokens = {"rl": float(mb.mask.sum()), "ptx": float(ptx_batch.mask.sum()) if with_ptx else 0.0}
    total = distributed.reduce_sum(tokens)  # the same as ``tokens`` on one process
    with distributed.gradient_sync(policy, sync=not with_ptx):
        with autocast(models):
            logprobs = token_logprobs(policy, mb.input_ids, mb.attention_mask, temperature,
                                      start=first_response_column(mb.mask))  # (b, T-1)
        loss, stats = ppo_policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, clip_eps)
        _scaled(loss, tokens["rl"], total["rl"]).backward()  # before the ptx forward: the graphs never coexist
    out = distributed.weighted_means(
        {"policy_loss": float(loss.detach()), "clip_frac": float(stats.clip_frac),
         "approx_kl": float(stats.approx_kl), "ratio_mean": float(stats.ratio_mean)}, tokens["rl"], total["rl"])
    if with_ptx:
        with distributed.gradient_sync(policy, sync=True):
            with autocast(models):
                lm_loss = pretraining_loss(policy, ptx_batch.to(models.device))
            _scaled(ptx_coef * lm_loss, tokens["ptx"], total["ptx"]).backward()
        out |= distributed.weighted_means({"ptx_loss": float(lm_loss.detach())}, tokens["ptx"], total["ptx"])
    out["policy_grad_norm"] = clip_and_step(models.policy, optimizer, max_grad_norm)
    return out


def _scaled(loss: torch.Tensor, local_tokens: float, total_tokens: float) -> torch.Tensor:
    """``loss`` as this rank backpropagates it (``distributed.loss_scale``); itself on one process."""
    scale = distributed.loss_scale(local_tokens, total_tokens)
    return loss if scale == 1.0 else loss * scale


def value_step(models: PPOModels, optimizer: torch.optim.Optimizer, mb: Experience, *, value_clip_eps: float,
               max_grad_norm: float | None, replicas: TrainedReplicas | None = None) -> dict[str, float]:
    """Clipped value loss toward the GAE returns; one optimizer step. Data-parallel
    (``replicas``): a mean over all ranks' tokens, as in ``policy_step``."""
    _require_replicas(replicas)
    tokens = float(mb.mask.sum())
    total = distributed.reduce_sum({"tokens": tokens})["tokens"]
    values_of = models.value_model if replicas is None else replicas.values
    with distributed.gradient_sync(values_of, sync=True):
        with autocast(models):
            values = token_values(values_of, mb.input_ids, mb.attention_mask,
                                  response_mask_from_grid(mb.mask))  # (b, T-1)
        loss, stats = value_loss(values, mb.old_values, mb.returns, mb.mask, value_clip_eps)
        _scaled(loss, tokens, total).backward()
    out = distributed.weighted_means({"value_loss": float(loss.detach()), "value_clip_frac": float(stats.clip_frac),
                                      "value_mean": float(stats.value_mean)}, tokens, total)
    out["value_grad_norm"] = clip_and_step(models.value_model, optimizer, max_grad_norm)
    return out


def ppo_minibatch_step(models: PPOModels, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
                       mb: Experience, ptx_batch: PtxBatch | None, config: PPOConfig,
                       replicas: TrainedReplicas | None = None) -> dict[str, float]:
    """One policy step (with the pretraining mix) and one value step on a minibatch. Data-parallel:
    ``replicas`` (``data_parallel_replicas``), and ``mb``/``ptx_batch`` are this rank's rows."""
    policy_optimizer, value_optimizer = optimizers
    stats = policy_step(models, policy_optimizer, mb, ptx_batch, clip_eps=config.clip_eps, ptx_coef=config.ptx_coef,
                        temperature=config.temperature, max_grad_norm=config.max_grad_norm, replicas=replicas)
    if uses_values(config):
        stats |= value_step(models, value_optimizer, mb, value_clip_eps=config.value_clip_eps,
                            max_grad_norm=config.max_grad_norm, replicas=replicas)
    return stats


def uses_values(config: PPOConfig) -> bool:
    """Whether the advantages need the value model (GAE does; RLOO's baseline is the prompt's other responses)."""
    return config.advantage_estimator == "gae"


def ppo_update(models: PPOModels, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
               experience: Experience, ptx_batches: PtxBatcher | None, config: PPOConfig,
               replicas: TrainedReplicas | None = None, global_rollouts: int | None = None) -> dict[str, float]:
    """``ppo_epochs`` passes over shuffled minibatches; returns each statistic's mean over steps.
    Data-parallel (``replicas``): ``experience`` is this rank's ``global_rollouts`` share; every
    rank runs the same number of steps (``distributed.local_steps``) on its own rows and its
    shard of the same pretraining batch."""
    steps: list[dict[str, float]] = []
    global_rollouts = len(experience) if global_rollouts is None else global_rollouts
    for _epoch in range(config.ppo_epochs):
        order = torch.randperm(len(experience), device=experience.input_ids.device)
        for rows in distributed.local_steps(len(experience), global_rollouts, config.minibatch_size):
            # every rank draws the same pretraining batch and takes its share (all of it on one process)
            ptx_batch = distributed.shard(ptx_batches.next_batch()) if ptx_batches is not None else None
            steps.append(ppo_minibatch_step(models, optimizers, experience.select(order[rows]), ptx_batch, config,
                                            replicas))
    return {key: sum(s[key] for s in steps) / len(steps) for key in steps[0]}


def whiten_over_ranks(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_whiten`` over ALL ranks' response tokens (one all-reduce of three sums), as one
    process whitens the whole batch; plain ``masked_whiten`` on one process."""
    if not distributed.world().distributed:
        return masked_whiten(advantages, mask)
    valid = mask.to(advantages.dtype)
    sums = distributed.reduce_sum({"n": float(valid.sum()), "sum": float((advantages * valid).sum()),
                                   "sum_sq": float((advantages * advantages * valid).sum())})
    return whiten_from_sums(advantages, mask, sums["n"], sums["sum"], sums["sum_sq"])


# ---------------------------------------------------------------------------- one iteration


class PhaseTimer:
    """Wall-clock seconds per named phase (CUDA work is synchronised at each phase's end)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ppo_iteration(models: PPOModels, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
                  generator: RolloutGenerator, ptx_batches: PtxBatcher | None,
                  kl_controller: FixedKLController | AdaptiveKLController, prompts: list[PromptExample],
                  config: PPOConfig, iteration: int, replicas: TrainedReplicas | None = None) -> dict[str, Any]:
    """Rollout -> score -> log-probs and values -> rewards -> GAE -> PPO epochs -> KL control.
    Data-parallel (``replicas``): ``prompts`` is the iteration's global batch; this rank rolls
    out its shard, whitens and steers the KL over all ranks, and trains on its own rollouts."""
    timer = PhaseTimer(models.device)
    ranks = distributed.world()
    group = config.samples_per_prompt  # each prompt's responses stay together, on one rank
    global_rollouts = len(prompts) * group
    prompts = [p for p in distributed.shard(prompts) for _ in range(group)]
    with timer("rollout"):
        rollouts = collect_rollouts(generator, prompts, config,
                                    seed=(config.seed * 1_000_003 + iteration) * ranks.size + ranks.rank)
        batch = rollout_batch(rollouts, models.tokenizer.pad_token_id).to(models.device)
    with timer("score"):
        scores = score_rollouts(models.reward_model, batch, config.forward_batch_size)  # (B,)
        scores = apply_missing_eos_penalty(scores, rollouts.stopped, config.missing_eos_penalty)
    with timer("logprobs_values"):
        experience = evaluate_rollouts(models, batch, scores, config.temperature, config.forward_batch_size,
                                       with_values=uses_values(config))
    with timer("advantages"):
        kl_coef = kl_controller.value
        rewards = kl_penalized_rewards(scores, experience.old_logprobs, experience.ref_logprobs, experience.mask,
                                       kl_coef, config.kl_estimator)  # (B, T-1)
        if uses_values(config):
            advantages, returns = compute_advantages(experience.old_values, rewards, experience.mask,
                                                     gamma=config.gamma, lam=config.lam, whiten=False)
        else:  # no value model to train: the returns are not used
            advantages = rloo_advantages(rewards, experience.mask, group)
            returns = advantages
        if config.whiten_advantages:
            advantages = whiten_over_ranks(advantages, experience.mask)
        experience = dataclasses.replace(experience, rewards=rewards, advantages=advantages, returns=returns)
    with timer("train"):
        train_stats = ppo_update(models, optimizers, experience, ptx_batches, config, replicas, global_rollouts)
    kl_per_sequence = sequence_kl(experience, config.kl_estimator)  # (B,)
    # Every rank's controller takes the same (global) figures, so kl_coef stays the same everywhere.
    overall = distributed.weighted_means({"kl": float(kl_per_sequence.mean()), "score": float(scores.mean())},
                                         len(rollouts), global_rollouts)
    kl_controller.update(overall["kl"], n_steps=global_rollouts)
    stats = iteration_stats(iteration, rollouts, experience, kl_per_sequence, kl_coef, train_stats, timer,
                            peak_memory_mb(models.device))
    if ranks.distributed:  # the rest of the statistics are this rank's shard's
        stats.update(rm_score=overall["score"], kl_ref=overall["kl"], rank_rollouts=len(rollouts))
    return stats


def sequence_kl(experience: Experience, estimator: str) -> torch.Tensor:
    """Per-sequence KL(pi || pi_ref) estimate: the sum over response tokens of ``estimator``. Shape: (B,)."""
    return compute_approx_kl(experience.old_logprobs, experience.ref_logprobs, experience.mask, estimator).sum(dim=1)


def iteration_stats(iteration: int, rollouts: Rollouts, experience: Experience, kl_per_sequence: torch.Tensor,
                    kl_coef: float, train_stats: dict[str, float], timer: PhaseTimer, peak_mb: float
                    ) -> dict[str, Any]:
    """A JSON-serialisable summary of one iteration."""
    lengths = rollouts.response_lengths
    return {
        "iteration": iteration,
        "rm_score": float(experience.scores.mean()),
        "rm_score_std": float(experience.scores.std()) if len(rollouts) > 1 else 0.0,
        "kl_ref": float(kl_per_sequence.mean()),  # nats per sequence (kl_estimator sum), before this update
        "kl_coef": kl_coef,
        "non_score_reward": float(-kl_coef * kl_per_sequence.mean()),
        "entropy": float(masked_mean(experience.entropy, experience.mask)),  # nats per token
        "return_mean": float(masked_mean(experience.returns, experience.mask)),
        "response_length": sum(lengths) / len(lengths),
        "response_length_max": max(lengths),
        "stopped_fraction": sum(rollouts.stopped) / len(rollouts),
        **train_stats,
        "ptx_loss": train_stats.get("ptx_loss"),
        "seconds": {**timer.seconds, "total": sum(timer.seconds.values())},
        "peak_memory_mb": peak_mb,
    }


# ---------------------------------------------------------------------------- the recipe


@dataclass
class PPOResult:
    """What a PPO run did; JSON-serialisable through ``to_dict``."""

    out_dir: str
    adapter_base_dir: str | None  # the base of the adapters in out_dir/adapter (None: none written)
    history: list[dict[str, Any]]
    config: dict[str, Any]
    final_kl_coef: float
    policy_trainable_params: int
    value_trainable_params: int
    device: str
    seconds: float
    peak_memory_mb: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_ppo(
    policy_dir: Path | str,
    ref_dir: Path | str,
    rm_dir: Path | str,
    prompts: Sequence[PromptExample],
    config: PPOConfig,
    out_dir: Path | str,
    corpus_texts: Sequence[str] | None = None,
    *,
    rollout_generator: RolloutGenerator | None = None,
    progress: bool = True,
) -> PPOResult:
    """PPO-ptx from the policy in ``policy_dir`` against the RM in ``rm_dir``, with a KL penalty to
    the frozen reference in ``ref_dir`` (the SFT model); saves the final policy (+ tokenizer) to
    ``out_dir`` as a HF folder (LoRA adapters merged), and in lora mode, when the adapters sit
    on the reference (``load_lora_policy``), the adapters alone to ``out_dir/adapter`` as well.

    ``corpus_texts``: the pretraining texts for the ptx term (default: the shipped corpus minus
    its held-out slice). ``rollout_generator``: an engine that samples from the CURRENT policy
    weights (default: HF generate on the policy module itself).
    """
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt")
    started = time.perf_counter()
    device = resolve_device(config.device)
    seed_everything(config.seed)
    with num_threads(config.num_threads):
        models = load_models(policy_dir, ref_dir, rm_dir, config, device, resolve_dtype(config.dtype, device))
        optimizers = build_optimizers(models, config)
        ptx_batches = build_ptx_batcher(models.tokenizer, corpus_texts, config)
        generator = rollout_generator or build_rollout_generator(models, policy_dir, config)
        kl_controller = build_kl_controller(config)
        ranks = distributed.world()
        if distributed.sharded() and (config.train_mode == "lora" or config.rollout_engine != "hf"):
            raise ValueError("sharded weights (RLHF_DATA_PARALLEL=fsdp2) train the full policy with HF rollouts: "
                             f"not train_mode={config.train_mode!r}, rollout_engine={config.rollout_engine!r}")
        prompts_per_iteration = config.rollouts_per_iteration // config.samples_per_prompt
        if ranks.size > prompts_per_iteration:
            raise ValueError(f"{prompts_per_iteration} prompts per iteration (rollouts_per_iteration="
                             f"{config.rollouts_per_iteration} / samples_per_prompt={config.samples_per_prompt}) give "
                             f"some of the {ranks.size} ranks no rollout")
        replicas = data_parallel_replicas(models) if ranks.distributed else None
        prompt_batches = prompt_schedule(list(prompts), prompts_per_iteration, config.seed)
        history: list[dict[str, Any]] = []
        bar = tqdm(range(config.iterations), desc=f"ppo ({config.train_mode})", disable=not progress_enabled(progress))
        for iteration in bar:
            threads = adapt_threads(config.num_threads)
            if iteration > 0:
                generator.sync(models.policy)  # an engine with its own copy of the weights takes the update
            stats = ppo_iteration(models, optimizers, generator, ptx_batches, kl_controller, next(prompt_batches),
                                  config, iteration, replicas)
            stats["threads"] = threads
            history.append(stats)
            bar.set_postfix(score=f"{stats['rm_score']:.3f}", kl=f"{stats['kl_ref']:.2f}")
        adapter_base_dir = models.adapter_base_dir
        whole = distributed.full_state_dict(models.policy)  # sharded weights: gathered by every rank
        if ranks.is_coordinator:  # the ranks' weights are the same: one writes them
            save_policy(models.policy, models.tokenizer, Path(out_dir), with_adapter=adapter_base_dir is not None,
                        state_dict=whole)
        if rollout_generator is None:
            generator.close()
    return PPOResult(
        out_dir=str(out_dir), adapter_base_dir=None if adapter_base_dir is None else str(adapter_base_dir),
        history=history, config=config.to_dict(), final_kl_coef=kl_controller.value,
        policy_trainable_params=sum(p.numel() for p in trainable_parameters(models.policy)),
        value_trainable_params=sum(p.numel() for p in trainable_parameters(models.value_model)),
        device=str(device), seconds=time.perf_counter() - started, peak_memory_mb=peak_memory_mb(device))


def build_rollout_generator(models: PPOModels, policy_dir: Path | str, config: PPOConfig) -> RolloutGenerator:
    """The engine of ``config.rollout_engine``, sampling from the policy's current weights."""
    if config.rollout_engine == "vllm":
        from trainer.rollout_vllm import VLLMRolloutGenerator

        return VLLMRolloutGenerator(policy_dir, models.tokenizer, seed=config.seed)
    return HFRolloutGenerator(models.policy, models.tokenizer, batch_size=config.forward_batch_size)


def save_policy(policy: torch.nn.Module, tokenizer: Any, out_dir: Path, *, with_adapter: bool = False,
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the policy as a plain HF folder with its tokenizer, LoRA adapters merged in (what the
    HF engine, evaluation and full swaps load). ``with_adapter``: first save the adapters alone
    to ``out_dir/adapter`` (PEFT's format), which a server can load beside the policy it serves.
    ``state_dict``: the whole weights of a sharded policy (``distributed.full_state_dict``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if with_adapter:
        policy.save_pretrained(out_dir / ADAPTER_DIR)  # before merging: merge_and_unload drops them
    if callable(getattr(policy, "merge_and_unload", None)):
        policy = policy.merge_and_unload()
    policy.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    return out_dir
