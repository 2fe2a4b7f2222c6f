"""Step 1: supervised fine-tuning on labeler demonstrations.

Recipe (``train_sft``): load the policy -> encode demonstrations -> per epoch: train with
residual dropout and a cosine LR -> validation loss -> (with a reward model) mean RM score
of greedy samples on validation prompts -> save the epoch if it is the best so far.

The paper keeps the epoch with the best RM score, not the best validation loss: validation
loss overfits after one epoch while RM score and human preference keep improving.

One optimiser step is ``sft_step``; data-parallel under torchrun (``trainer.distributed``) it
takes this rank's shard of the step and the model as a DDP replica, and its token-level
mean runs over all ranks' tokens.

Residual dropout, the optimiser and its schedule are ``trainer.torch_parts``' (shared with
the reward model): the dropout hooks exist only while training, the saved model has none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.chat import render_chat_ids
from common.models import load_causal_lm, load_tokenizer, resolve_dtype
from trainer import distributed
from trainer.config import SFTConfig
from trainer.data import encode_response, pack_sequences
from trainer.device import adapt_threads, num_threads, progress_enabled, resolve_device, seed_everything
from trainer.evaluate import as_messages, sample_responses
from trainer.examples import Demonstration, Messages, PromptExample
from trainer.losses import sft_loss
from trainer.torch_parts import build_optimizer, eval_mode, model_device, training_dropout

# ---------------------------------------------------------------------------- data


@dataclass
class EncodedDemo:
    prompt_ids: list[int]
    response_ids: list[int]


def encode_demonstrations(
    tokenizer: Any, demonstrations: Sequence[Demonstration], max_response_length: int
) -> list[EncodedDemo]:
    """Chat-templated prompt ids and response ids (+ EOS) per demonstration."""
    return [EncodedDemo(render_chat_ids(tokenizer, d.messages), encode_response(tokenizer, d.response,
                                                                               max_response_length))
            for d in demonstrations]


def demo_batch(examples: Sequence[EncodedDemo], pad_token_id: int, max_length: int):
    return pack_sequences([e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_token_id,
                          max_length)


def response_nll(model: torch.nn.Module, batch) -> torch.Tensor:
    """Token-level mean NLL of the response tokens of a batch (the SFT loss). 0-dim."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    # Token t is predicted at t - 1 (trainer.data.shift_for_labels).
    return sft_loss(logits[:, :-1, :].float(), batch.input_ids[:, 1:], batch.response_mask[:, 1:])


def validation_loss(
    model: torch.nn.Module, examples: Sequence[EncodedDemo], pad_token_id: int, max_length: int, batch_size: int
) -> float | None:
    """Token-level mean response NLL over all validation demonstrations (None when empty)."""
    if not examples:
        return None
    device = model_device(model)
    nll, tokens = 0.0, 0.0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = demo_batch(examples[start:start + batch_size], pad_token_id, max_length).to(device)
            n = float(batch.response_mask[:, 1:].sum())
            nll += float(response_nll(model, batch)) * n
            tokens += n
    return nll / max(tokens, 1.0)


# ---------------------------------------------------------------------------- the recipe


@dataclass
class SFTResult:
    """What SFT did; JSON-serialisable through ``to_dict``."""

    out_dir: str
    best_epoch: int
    selected_by: str  # "rm_score" | "val_loss" | "last_epoch"
    initial_val_loss: float | None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_sft(
    model_dir: Path | str,
    demonstrations: Sequence[Demonstration],
    val_demonstrations: Sequence[Demonstration],
    config: SFTConfig,
    out_dir: Path | str,
    *,
    reward_model: Any | None = None,
    val_prompts: Sequence[Messages | PromptExample] | None = None,
) -> SFTResult:
    """Fine-tune the causal LM in ``model_dir`` on demonstrations; save the best epoch to ``out_dir``.

    With ``reward_model`` (a ``trainer.reward_model.RewardModel``), each epoch is also scored
    by the RM's mean score of greedy samples on ``val_prompts`` (default: the validation
    demonstrations' prompts), and the best-scoring epoch is kept, as in the paper.
    """
    if not demonstrations:
        raise ValueError("no demonstrations to train on")
    with num_threads(config.num_threads):
        return _train_sft(model_dir, demonstrations, val_demonstrations, config, Path(out_dir), reward_model,
                          val_prompts)


def _train_sft(model_dir, demonstrations, val_demonstrations, config: SFTConfig, out_dir: Path, reward_model,
               val_prompts) -> SFTResult:
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model = load_causal_lm(model_dir, dtype=resolve_dtype(config.dtype, device), device=device)
    tokenizer = load_tokenizer(model_dir, padding_side="right")
    pad_id = tokenizer.pad_token_id

    train = encode_demonstrations(tokenizer, demonstrations, config.max_response_length)
    val = encode_demonstrations(tokenizer, val_demonstrations, config.max_response_length)
    rm_prompts = _rm_eval_prompts(reward_model, val_prompts, val_demonstrations, config.max_eval_prompts)
    selected_by = _selection_metric(config.selection_metric, rm_prompts, val)

    ranks = distributed.world()
    # Data-parallel: every rank shuffles the same global order and takes its share of each
    # step; the coordinator alone validates, selects the epoch and saves (sharded weights:
    # every rank validates, since every forward is a collective).
    replica = distributed.wrap_data_parallel(model) if ranks.distributed else None
    steps_per_epoch = len(global_steps(len(train), config.batch_size, ranks.size))
    optimizer, schedule = build_optimizer(
        list(model.named_parameters()), config.learning_rate, config.weight_decay,
        (config.adam_beta1, config.adam_beta2), steps_per_epoch * config.epochs, config.warmup_ratio,
        config.min_lr_ratio)
    generator = torch.Generator().manual_seed(config.seed)
    if distributed.is_sharded(model) and rm_prompts:
        raise ValueError("selection by RM score samples on one rank: not with sharded weights (RLHF_DATA_PARALLEL=fsdp2)")
    # Sharded (FSDP2) weights: a forward is a collective, so every rank validates (and
    # follows the coordinator's choice of epoch: ``_keep``).
    validates = ranks.is_coordinator or distributed.is_sharded(model)
    result = SFTResult(str(out_dir), best_epoch=0, selected_by=selected_by, num_train=len(train),
                       num_val=len(val),
                       initial_val_loss=validation_loss(model, val, pad_id, config.max_length, config.eval_batch_size)
                       if validates else None)
    best = -math.inf
    bar = tqdm(total=steps_per_epoch * config.epochs, desc="sft", disable=not progress_enabled(config.show_progress))
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        threads = adapt_threads(config.num_threads)
        order = torch.randperm(len(train), generator=generator).tolist()
        with training_dropout(model, config.residual_dropout, config.attention_dropout):
            train_loss = _train_epoch(model, [train[i] for i in order], optimizer, schedule, config, pad_id, bar,
                                      replica)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr_end": schedule.get_last_lr()[0],
                                   "threads": threads}
        if not validates:  # a follower: it trained its share; the coordinator keeps the best epoch
            result.epochs.append(metrics)
            continue
        metrics["val_loss"] = validation_loss(model, val, pad_id, config.max_length, config.eval_batch_size)
        if rm_prompts:
            metrics["rm_score"] = _mean_rm_score(model, tokenizer, reward_model, rm_prompts, config)
        metrics["seconds"] = time.perf_counter() - epoch_started
        value = _selection_value(selected_by, metrics)
        metrics["selected"] = _keep(value > best, model)
        if metrics["selected"]:
            best, result.best_epoch = value, epoch
            _save(model, tokenizer, out_dir)
        result.epochs.append(metrics)
    bar.close()
    result.seconds = time.perf_counter() - started
    return result


def global_steps(n: int, batch_size: int, world_size: int = 1) -> list[slice]:
    """An epoch's optimiser steps over ``n`` shuffled demonstrations: consecutive slices of
    ``batch_size``; on several ranks a last step too small to give every rank one
    demonstration joins the step before it (every rank takes part in every step)."""
    steps = [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if world_size > 1 and len(steps) > 1 and steps[-1].stop - steps[-1].start < world_size:
        steps[-2:] = [slice(steps[-2].start, n)]
    if world_size > 1 and steps and steps[-1].stop - steps[-1].start < world_size:
        raise ValueError(f"{n} demonstrations cannot give each of {world_size} ranks one per step")
    return steps


def _train_epoch(model, examples, optimizer, schedule, config: SFTConfig, pad_id: int, bar, replica=None) -> float:
    """One pass; returns the mean over optimizer steps of the step's token-level loss.
    Data-parallel (``replica``): this rank's share of each step (``distributed.shard``)."""
    model.train()
    device = model_device(model)
    micro = config.micro_batch_size or config.batch_size
    step_losses = []
    for step_slice in global_steps(len(examples), config.batch_size, distributed.world().size):
        step = distributed.shard(examples[step_slice])
        batches = [demo_batch(step[i:i + micro], pad_id, config.max_length).to(device)
                   for i in range(0, len(step), micro)]
        step_loss = sft_step(model, batches, optimizer, max_grad_norm=config.max_grad_norm, replica=replica)
        schedule.step()
        step_losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    model.eval()
    return sum(step_losses) / len(step_losses)


def sft_step(model: torch.nn.Module, batches: Sequence[Any], optimizer: torch.optim.Optimizer, *,
             max_grad_norm: float | None, replica: Any | None = None) -> float:
    """One optimiser step on a step's micro-batches (``demo_batch``es); returns the step's loss:
    the mean NLL over ALL its response tokens (each micro-batch weighted by its token share).

    Data-parallel (under torchrun, ``trainer.distributed``): ``batches`` are this rank's
    shard of the step and ``replica`` is ``distributed.wrap_data_parallel(model)``; the token count is
    all-reduced and each backward scaled by the world size W, since DDP AVERAGES the ranks'
    gradients: the update is the one a single process makes on the whole step. Only the last
    micro-batch's backward all-reduces. On one process nothing is scaled or reduced.
    """
    world_size = distributed.world().size
    if world_size > 1 and replica is None:
        raise ValueError("a data-parallel sft_step needs replica=distributed.wrap_data_parallel(model): gradients would not sync")
    if not batches:
        raise ValueError("sft_step got no batch: a step needs at least one demonstration on every rank")
    local_tokens = sum(float(b.response_mask[:, 1:].sum()) for b in batches)
    step_tokens = distributed.reduce_sum({"tokens": local_tokens})["tokens"]  # all ranks' (local_tokens on one)
    # Token-level mean over the whole step: weight each micro-batch by its token share.
    weights = [float(b.response_mask[:, 1:].sum()) / max(step_tokens, 1.0) for b in batches]
    if distributed.is_sharded(model):
        # Every forward and backward through sharded weights is a collective: a rank with
        # fewer micro-batches than another repeats its first with weight 0 (no gradient).
        missing = int(distributed.reduce_max({"batches": len(batches)})["batches"]) - len(batches)
        batches, weights = list(batches) + [batches[0]] * missing, weights + [0.0] * missing
    optimizer.zero_grad(set_to_none=True)
    step_loss = 0.0
    for i, (batch, weight) in enumerate(zip(batches, weights)):
        with distributed.gradient_sync(replica, sync=i == len(batches) - 1):
            loss = response_nll(model if replica is None else replica, batch) * weight
            # DDP averages over the W ranks; W * loss makes that average the sum over ranks.
            (loss * world_size if world_size > 1 else loss).backward()
        step_loss += float(loss.detach())
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return distributed.reduce_sum({"loss": step_loss})["loss"]


def _rm_eval_prompts(reward_model, val_prompts, val_demonstrations, limit: int | None) -> list[Messages]:
    if reward_model is None:
        return []
    source = val_prompts if val_prompts is not None else [d.messages for d in val_demonstrations]
    prompts = [as_messages(p) for p in source]
    return prompts[:limit] if limit is not None else prompts


def _selection_metric(wanted: str, rm_prompts: list, val: list) -> str:
    if wanted == "rm_score" and not rm_prompts:
        raise ValueError("selection_metric='rm_score' needs a reward_model and validation prompts")
    if wanted == "rm_score" or (wanted == "auto" and rm_prompts):
        return "rm_score"
    return "val_loss" if val else "last_epoch"


def _selection_value(selected_by: str, metrics: dict[str, Any]) -> float:
    """Larger is better."""
    if selected_by == "rm_score":
        return metrics["rm_score"]
    if selected_by == "val_loss":
        return -metrics["val_loss"]
    return float(metrics["epoch"])


def _mean_rm_score(model, tokenizer, reward_model, prompts: list[Messages], config: SFTConfig) -> float:
    responses, stopped = sample_responses(model, tokenizer, prompts, max_new_tokens=config.eval_max_new_tokens,
                                          temperature=0.0, seed=config.seed, batch_size=config.eval_batch_size,
                                          with_stopped=True)
    scores = reward_model.score_texts(tokenizer, prompts, responses, batch_size=config.eval_batch_size,
                                      stopped=stopped)
    return float(scores.float().mean())


def _keep(better: bool, model: torch.nn.Module) -> bool:
    """The coordinator's verdict on every rank (sharded weights: saving is a collective that
    every rank must enter together); the rank's own verdict otherwise."""
    if not distributed.is_sharded(model):
        return better
    return distributed.reduce_sum({"keep": float(better and distributed.world().is_coordinator)})["keep"] > 0


def _save(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """The coordinator writes the model; sharded (FSDP2) weights are gathered on every rank first."""
    whole = distributed.full_state_dict(model)
    if not distributed.world().is_coordinator:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=whole)
    tokenizer.save_pretrained(out_dir)
