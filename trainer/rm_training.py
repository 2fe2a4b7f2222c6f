"""Step 2's recipe: train the reward model on K-way rankings.

Training (``train_reward_model``) follows the paper: each prompt's K completions (K = 2..9)
are ONE batch element; every completion gets exactly one forward pass and all C(K, 2) pairs
enter the loss (``trainer.losses.batched_ranking_loss``), instead of two passes per pair.
Which weights train is ``RMConfig.train_mode``: ``full``, ``lora`` (merged before saving),
``top_layers`` or ``head``. With a frozen trunk the lower layers' output is computed once
per completion and reused in every epoch (``RMConfig.cache_trunk``, ``trainer.trunk_cache``):
exact, since those layers never change, and an epoch then costs the top layers only. The
validation and bias scoring read the same states, and a ``trainer.trunk_cache.TrunkCache``
passed in keeps them for the next training on the same frozen trunk (the judge, the next cycle).

One optimiser step is ``rm_step``; data-parallel under torchrun (``trainer.distributed``)
it takes this rank's shard of the step's prompts and the DDP scorer
(``data_parallel_scorer``) and makes the update one process makes on the whole step.

The model itself, its scoring and its folder format are ``trainer.reward_model``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.chat import render_chat_ids
from common.models import resolve_dtype
from trainer import distributed
from trainer.config import RMConfig
from trainer.data import encode_response, pack_sequences
from trainer.device import adapt_threads, num_threads, progress_enabled, resolve_device, seed_everything
from trainer.evaluate import pairwise_accuracy
from trainer.examples import Comparison, Demonstration, Messages
from trainer.lora import add_lora
from trainer.losses import batched_ranking_loss
from trainer.reward_model import RewardModel
from trainer.rm_heads import gather_last
from trainer.torch_parts import build_optimizer, eval_mode, train_only_top_layers, training_dropout
from trainer.trunk_cache import FrozenTrunk, TrunkCache, attach_trunk_states, bind_trunk, scoring_from_trunk

# ---------------------------------------------------------------------------- the recipe


@dataclass
class RMResult:
    """What RM training did; JSON-serialisable through ``to_dict``."""

    out_dir: str
    train_mode: str
    trunk_cached: bool
    num_train: int
    num_val: int
    skipped_all_tied: int
    trainable_params: int
    total_params: int
    head: str = "last_token"
    num_train_pairs: int = 0  # ordered pairs in the training comparisons (ties give none)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, Any] = field(default_factory=dict)  # pairwise accuracy, overall and per group
    bias: float = 0.0
    bias_source: str = "none"  # "demonstrations" | "bias_prompts" | "none"
    bias_reference_mean: float | None = None  # mean score of the reference texts before the shift
    forward_passes: int = 0  # training sequences through the backbone (a cached trunk: once each, all epochs)
    # With a cached trunk: rows (training, validation, bias) whose trunk states came from the
    # cache of an earlier training, and rows computed here.
    trunk_reused: int = 0
    trunk_computed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_reward_model(
    model_dir_or_rm: Path | str | RewardModel,
    comparisons: Sequence[Comparison],
    val_comparisons: Sequence[Comparison],
    config: RMConfig,
    out_dir: Path | str,
    *,
    demonstrations: Sequence[Demonstration] | None = None,
    bias_prompts: Sequence[tuple[Messages, str]] | None = None,
    trunk_cache: TrunkCache | None = None,
) -> RMResult:
    """Train an RM on K-way comparisons, normalise its bias, report held-out accuracy, save it.

    ``model_dir_or_rm``: a causal-LM folder (the SFT policy: a fresh head is put on its
    backbone) or a ``RewardModel`` (trained in place, e.g. the previous cycle's RM).
    Bias: demonstrations (prompt + response) score mean 0; without them, the
    ``(messages, response)`` pairs of ``bias_prompts`` (e.g. SFT samples on validation prompts).
    ``trunk_cache``: where a cached trunk's states are looked up and kept (across trainings on
    the same frozen model folder); without one they are kept for this training only.
    """
    with num_threads(config.num_threads):
        return _train_reward_model(model_dir_or_rm, comparisons, val_comparisons, config, out_dir,
                                   demonstrations, bias_prompts, trunk_cache)


def _train_reward_model(model_dir_or_rm, comparisons, val_comparisons, config: RMConfig, out_dir,
                        demonstrations, bias_prompts, trunk_cache: TrunkCache | None) -> RMResult:
    started = time.perf_counter()
    seed_everything(config.seed)
    rm = load_reward_model(model_dir_or_rm, config)
    pad_id = rm.tokenizer.pad_token_id
    usable = ordered_comparisons(comparisons)
    calls_before = rm.forward_calls
    adapt_threads(config.num_threads)
    # Data-parallel: each rank owns a fixed share of the rankings (its trunk states are
    # computed once, on that rank); the coordinator alone validates, sets the bias and saves.
    mine = distributed.shard(usable)
    train, trunk, normalizer_passes = training_items(rm, mine, trunk_folder(model_dir_or_rm), config, trunk_cache)
    result = describe_training(rm, config, out_dir, trunk, comparisons, usable, val_comparisons)
    result.epochs = fit_epochs(rm, train, config, pad_id, global_items=len(usable))
    result.forward_passes = rm.forward_calls - calls_before - normalizer_passes  # trunk + epochs
    finish_training(rm)
    if not distributed.world().is_coordinator:
        result.seconds = time.perf_counter() - started
        return result
    adapt_threads(config.num_threads)
    result.val, result.bias_source, result.bias_reference_mean = validate_and_set_bias(
        rm, trunk, val_comparisons, demonstrations, bias_prompts, config.eval_batch_size)
    if trunk is not None:
        result.trunk_reused, result.trunk_computed = trunk.rows_reused, trunk.rows_computed
    result.bias = float(rm.bias)
    rm.save(out_dir)
    result.seconds = time.perf_counter() - started
    return result


def load_reward_model(model_dir_or_rm: Path | str | RewardModel, config: RMConfig) -> RewardModel:
    """The RM to train: ``model_dir_or_rm`` itself, or a fresh head on the backbone in that folder."""
    if isinstance(model_dir_or_rm, RewardModel):
        rm = model_dir_or_rm
    else:
        device = resolve_device(config.device)
        rm = RewardModel.from_pretrained_lm(model_dir_or_rm, dtype=resolve_dtype(config.dtype, device), device=device,
                                            head_init_std=config.head_init_std, head=config.head,
                                            head_features=config.head_features, pool_depths=config.pool_depths,
                                            head_ensemble=config.head_ensemble, head_last_state=config.head_last_state)
    if rm.tokenizer is None:
        raise ValueError("the reward model has no tokenizer; load it with from_pretrained_lm or load")
    return rm


def ordered_comparisons(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons with at least one ordered pair (an all-tied ranking teaches nothing)."""
    usable = [c for c in comparisons if has_ordered_pair(c)]
    if not usable:
        raise ValueError("no comparison with an ordered pair to train on")
    return usable


def training_items(rm: RewardModel, comparisons: Sequence[Comparison], model_dir: Path | str | None,
                   config: RMConfig, trunk_cache: TrunkCache | None = None
                   ) -> tuple[list[EncodedComparison], FrozenTrunk | None, int]:
    """Make ``rm`` ready to train on ``comparisons``: encode them, set which weights train,
    bind the frozen trunk (``model_dir``: its folder, None for an RM trained in place) and
    attach its states to the items, fit the head's input standardisation. Returns the items,
    the trunk (None when every layer trains) and the forward passes the standardisation took."""
    pad_id = rm.tokenizer.pad_token_id
    items = encode_comparisons(rm.tokenizer, comparisons, config.max_response_length)
    prepare_for_training(rm, config)
    trunk = bind_trunk(rm, model_dir, config, trunk_cache)
    if trunk is not None:  # the frozen layers' output, once for all epochs (and for scoring after)
        attach_trunk_states(rm, items, trunk, pad_id, config.max_length, config.max_completions_per_step)
    passes = fit_head_normalizer(rm, items, pad_id, config.max_length, config.max_completions_per_step)
    return items, trunk, passes


def prepare_for_training(rm: RewardModel, config: RMConfig) -> None:
    """Record the training truncation on the RM (``score_texts`` applies it) and set which weights train."""
    rm.max_length, rm.max_response_length = config.max_length, config.max_response_length
    configure_trainable(rm, config.train_mode, top_layers=config.top_layers, lora_r=config.lora_r,
                        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)


def trunk_folder(model_dir_or_rm: Path | str | RewardModel) -> Path | str | None:
    """The model folder a frozen trunk comes from (its cache key); None for an RM trained in place."""
    return None if isinstance(model_dir_or_rm, RewardModel) else model_dir_or_rm


def validate_and_set_bias(rm: RewardModel, trunk: FrozenTrunk | None, val_comparisons: Sequence[Comparison],
                          demonstrations: Sequence[Demonstration] | None,
                          bias_prompts: Sequence[tuple[Messages, str]] | None, batch_size: int
                          ) -> tuple[dict[str, Any], str, float | None]:
    """Held-out pairwise accuracy, then the bias normalised (``normalise_bias``); returns
    (accuracy, bias source, reference mean before the shift)."""
    # The lower layers are still the frozen ones: validation and bias read the same trunk.
    with scoring_from_trunk(rm, trunk) if trunk is not None else contextlib.nullcontext():
        val = pairwise_accuracy(rm, rm.tokenizer, val_comparisons, batch_size=batch_size)
        source, mean = normalise_bias(rm, rm.tokenizer, demonstrations, bias_prompts, batch_size=batch_size)
    return val, source, mean


def describe_training(rm: RewardModel, config: RMConfig, out_dir: Path | str, trunk: FrozenTrunk | None,
                      comparisons: Sequence[Comparison], usable: Sequence[Comparison],
                      val_comparisons: Sequence[Comparison]) -> RMResult:
    """The result's fields known before the epochs: data sizes and what trains."""
    return RMResult(str(out_dir), config.train_mode, trunk_cached=trunk is not None, num_train=len(usable),
                    num_val=len(val_comparisons), skipped_all_tied=len(comparisons) - len(usable),
                    trainable_params=sum(p.numel() for p in rm.parameters() if p.requires_grad),
                    total_params=sum(p.numel() for p in rm.parameters()), head=rm.head_kind,
                    num_train_pairs=sum(ordered_pairs(c.ranks) for c in usable))


@torch.no_grad()
def fit_head_normalizer(rm: RewardModel, items: Sequence[EncodedComparison], pad_token_id: int,
                        max_length: int | None, max_sequences: int, max_rows: int = 512) -> int:
    """Fix the head's input standardisation from (up to ``max_rows``) training completions:
    the response tokens' states it pools and the last tokens' final states (from the cached
    trunk when only the head trains). Returns the forward passes that took (not training ones)."""
    if not rm.head.reads_tokens:
        return 0
    calls_before = rm.forward_calls
    device = next(rm.parameters()).device
    tokens, lasts, rows = [], [], 0
    for group in micro_batches(list(items), max_sequences):
        lengths = [len(ids) for item in group for ids in item.completion_ids]
        if all(item.trunk is not None and item.trunk_top_layers == 0 for item in group):
            for row, n in zip((s for item in group for s in item.trunk), lengths):
                states, last = rm.head_row_parts(row)
                tokens.append(states[len(states) - n:])  # (n, D): the response's token states
                lasts.append(last[None])  # (1, H): the final state at the last token
        else:
            batch, _, _, _ = comparison_batch(group, pad_token_id, max_length)
            with eval_mode(rm):
                token_states, final = rm.head_states(batch.input_ids.to(device), batch.attention_mask.to(device))
            tokens.append(token_states.cpu()[batch.response_mask.bool()])
            lasts.append(gather_last(final.cpu(), batch.attention_mask))
        rows += len(lengths)
        if rows >= max_rows:
            break
    rm.head.fit_normalizer(torch.cat(tokens).float().to(device), torch.cat(lasts).float().to(device))
    return rm.forward_calls - calls_before


def fit_epochs(rm: RewardModel, train: list[EncodedComparison], config: RMConfig, pad_id: int,
               global_items: int | None = None) -> list[dict[str, Any]]:
    """``config.epochs`` shuffled passes under AdamW with cosine decay; per-epoch metrics.
    Data-parallel: ``train`` is this rank's share of ``global_items`` rankings; each rank
    shuffles its own and every step takes part of each rank's (``distributed.local_steps``),
    through one DDP scorer (built after the head's standardisation: DDP copies rank 0's)."""
    global_items = len(train) if global_items is None else global_items
    steps_per_epoch = len(distributed.local_steps(len(train), global_items, config.batch_size))
    scorer = data_parallel_scorer(rm) if distributed.world().distributed else None
    optimizer, schedule = build_optimizer(
        list(rm.named_parameters()), config.learning_rate, config.weight_decay,
        (config.adam_beta1, config.adam_beta2), steps_per_epoch * config.epochs, config.warmup_ratio,
        config.min_lr_ratio)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=steps_per_epoch * config.epochs, desc=f"rm ({config.train_mode})",
               disable=not progress_enabled(config.show_progress))
    epochs = []
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        threads = adapt_threads(config.num_threads)
        order = torch.randperm(len(train), generator=generator).tolist()
        with training_dropout(rm.backbone, config.residual_dropout):
            metrics = _train_epoch(rm, [train[i] for i in order], optimizer, schedule, config, pad_id, bar,
                                   global_items, scorer)
        epochs.append({"epoch": epoch, **metrics, "seconds": time.perf_counter() - epoch_started, "threads": threads})
    bar.close()
    return epochs


def _train_epoch(rm: RewardModel, items: list[EncodedComparison], optimizer, schedule, config: RMConfig,
                 pad_id: int, bar, global_items: int, scorer: Callable[..., torch.Tensor] | None
                 ) -> dict[str, float]:
    """One pass over the comparisons; returns mean step loss and pooled pair accuracy."""
    rm.train()
    losses, right, pairs = [], 0.0, 0.0
    for step_slice in distributed.local_steps(len(items), global_items, config.batch_size):
        step = rm_step(rm, items[step_slice], optimizer, pad_token_id=pad_id,
                       max_length=config.max_length, max_sequences=config.max_completions_per_step,
                       max_grad_norm=config.max_grad_norm, scorer=scorer)
        schedule.step()
        losses.append(step.loss)
        right, pairs = right + step.right_pairs, pairs + step.pairs
        bar.update(1)
        bar.set_postfix(loss=f"{step.loss:.3f}")
    rm.eval()
    return {"train_loss": sum(losses) / len(losses), "train_accuracy": right / max(pairs, 1.0),
            "steps": len(losses), "lr_end": schedule.get_last_lr()[0]}


@dataclass
class RMStepStats:
    """One optimiser step's statistics, over all ranks when data-parallel."""

    loss: float  # the mean over the step's prompts of each prompt's K-way loss
    right_pairs: float  # ordered pairs the (ensemble's mean) score puts in the labeler's order
    pairs: float  # ordered pairs in the step
    grad_norm: float  # of the trainable weights, before clipping


def rm_step(rm: RewardModel, items: Sequence[EncodedComparison], optimizer: torch.optim.Optimizer, *,
            pad_token_id: int, max_length: int | None, max_sequences: int, max_grad_norm: float | None,
            scorer: Callable[..., torch.Tensor] | None = None) -> RMStepStats:
    """One optimiser step on a step's comparisons: the mean over its P prompts of the K-way loss.

    The prompts go through micro-batches of whole prompts (``micro_batches``: at most
    ``max_sequences`` completions), each weighted by its share len(group) / P of the prompts,
    gradients accumulated. Data-parallel (under torchrun, ``trainer.distributed``): ``items``
    is this rank's shard of the step and ``scorer`` is ``data_parallel_scorer(rm)``; P is
    all-reduced and each backward scaled by the world size W, since DDP AVERAGES the ranks'
    gradients: the update is the one a single process makes on the whole step. Only the last
    micro-batch's backward all-reduces. On one process nothing is scaled or reduced.
    """
    if not items:
        raise ValueError("rm_step got no comparisons: a step needs at least one prompt on every rank")
    if distributed.world().distributed and scorer is None:
        raise ValueError("data-parallel rm_step needs scorer=data_parallel_scorer(rm): gradients would not sync")
    prompts = distributed.reduce_sum({"prompts": len(items)})["prompts"]  # all ranks' (len(items) on one)
    world_size = distributed.world().size
    groups = micro_batches(items, max_sequences)
    optimizer.zero_grad(set_to_none=True)
    step_loss, right, pairs = 0.0, 0.0, 0.0
    for i, group in enumerate(groups):
        with distributed.gradient_sync(scorer, sync=i == len(groups) - 1):
            loss, stats = kway_loss(rm, group, pad_token_id, max_length, scorer=scorer)
            # Each prompt weighs the same in the step's mean, whatever micro-batch (or rank) it sits in.
            weighted = loss * (len(group) / prompts)
            # DDP averages over the W ranks; W * weighted makes that average the sum over ranks.
            (weighted * world_size if world_size > 1 else weighted).backward()
        step_loss += float(weighted.detach())
        right += float(stats.accuracy) * float(stats.num_pairs)
        pairs += float(stats.num_pairs)
    trainable = [p for p in rm.parameters() if p.requires_grad]
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    optimizer.step()
    totals = distributed.reduce_sum({"loss": step_loss, "right": right, "pairs": pairs})
    return RMStepStats(totals["loss"], totals["right"], totals["pairs"], float(grad_norm))


def normalise_bias(
    rm: RewardModel,
    tokenizer: Any,
    demonstrations: Sequence[Demonstration] | None,
    bias_prompts: Sequence[tuple[Messages, str]] | None,
    batch_size: int = 16,
) -> tuple[str, float | None]:
    """Shift ``rm.bias`` so the reference texts score mean 0; returns (source, their mean before)."""
    if demonstrations:
        source = "demonstrations"
        prompts, responses = [d.messages for d in demonstrations], [d.response for d in demonstrations]
    elif bias_prompts:
        source = "bias_prompts"
        prompts, responses = [m for m, _ in bias_prompts], [r for _, r in bias_prompts]
    else:
        return "none", None
    mean = float(rm.score_texts(tokenizer, prompts, responses, batch_size=batch_size).mean())
    rm.set_bias(float(rm.bias) - mean)  # scores are linear in the bias: the new mean is 0
    return source, mean


# ---------------------------------------------------------------------------- which weights train


def configure_trainable(rm: RewardModel, mode: str, *, top_layers: int, lora_r: int, lora_alpha: int,
                        lora_dropout: float) -> None:
    """Set ``requires_grad`` (and wrap LoRA adapters) for ``mode``; the head always trains."""
    if mode == "full":
        rm.requires_grad_(True)
    elif mode == "head":
        rm.requires_grad_(False)  # the whole trunk is frozen: only the head below trains
    elif mode == "top_layers":
        train_only_top_layers(rm.backbone, top_layers)
    elif mode == "lora":
        rm.backbone = add_lora(rm.backbone, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)  # freezes the rest
    else:
        raise ValueError(f"Unknown train_mode: {mode}")
    rm.head.requires_grad_(True)


def finish_training(rm: RewardModel) -> None:
    """Merge LoRA adapters into the backbone and make every weight trainable again (the PPO
    value model is a copy of this RM and trains all its weights)."""
    if callable(getattr(rm.backbone, "merge_and_unload", None)):
        rm.backbone = rm.backbone.merge_and_unload()
    rm.requires_grad_(True)


# ---------------------------------------------------------------------------- data and the loss


@dataclass
class EncodedComparison:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # EOS-terminated when the policy stopped
    ranks: list[int]
    # Cached trunk output per completion, (length, H) as packed (``attach_trunk_states``), or
    # None; the states enter the top ``trunk_top_layers`` decoder layers.
    trunk: list[torch.Tensor] | None = None
    trunk_top_layers: int = 0


def encode_comparisons(tokenizer: Any, comparisons: Sequence[Comparison], max_response_length: int
                       ) -> list[EncodedComparison]:
    """Token ids per comparison; the prompt is rendered once for its K completions. A
    completion the policy did not finish gets no EOS (``Comparison.stopped``)."""
    return [EncodedComparison(render_chat_ids(tokenizer, c.messages),
                              [encode_response(tokenizer, text, max_response_length, eos=stopped)
                               for text, stopped in zip(c.completions, c.stopped or [True] * len(c.completions))],
                              list(c.ranks))
            for c in comparisons]


def has_ordered_pair(comparison: Comparison) -> bool:
    return len(set(comparison.ranks)) > 1


def ordered_pairs(ranks: Sequence[int]) -> int:
    """Pairs a ranking orders (tied completions give none): C(K, 2) without ties."""
    return sum(1 for a in ranks for b in ranks if a < b)


def comparison_batch(items: Sequence[EncodedComparison], pad_token_id: int, max_length: int | None):
    """Flatten P prompts' completions into one right-padded batch of N = sum K sequences.

    Returns (batch (N, T), ranks (P, Kmax), valid (P, Kmax), index (P, Kmax)), where
    ``index[p, k]`` is the row of completion k of prompt p, and N at padding slots.
    """
    prompts = [item.prompt_ids for item in items for _ in item.completion_ids]
    responses = [ids for item in items for ids in item.completion_ids]
    batch = pack_sequences(prompts, responses, pad_token_id, max_length)
    k_max = max(len(item.completion_ids) for item in items)
    n = len(responses)
    ranks = torch.zeros((len(items), k_max), dtype=torch.long)
    valid = torch.zeros((len(items), k_max))
    index = torch.full((len(items), k_max), n, dtype=torch.long)
    row = 0
    for p, item in enumerate(items):
        k = len(item.completion_ids)
        ranks[p, :k] = torch.tensor(item.ranks)
        valid[p, :k] = 1.0
        index[p, :k] = torch.arange(row, row + k)
        row += k
    return batch, ranks, valid, index


def micro_batches(items: Sequence[EncodedComparison], max_sequences: int) -> list[list[EncodedComparison]]:
    """Split one step's prompts into groups of WHOLE prompts with at most ``max_sequences``
    completions each (a prompt with more completions than the cap forms its own group)."""
    groups: list[list[EncodedComparison]] = [[]]
    count = 0
    for item in items:
        k = len(item.completion_ids)
        if groups[-1] and count + k > max_sequences:
            groups.append([])
            count = 0
        groups[-1].append(item)
        count += k
    return [g for g in groups if g]


def kway_loss(rm: RewardModel, items: Sequence[EncodedComparison], pad_token_id: int, max_length: int | None,
              *, scorer: Callable[..., torch.Tensor] | None = None):
    """The paper's loss for P prompts with ONE forward pass per completion; returns (loss, stats).
    Items with cached trunk states (``attach_trunk_states``) run the top layers only.
    ``scorer``: ``completion_scores`` as DDP wraps it (``rm_step``); default: called on ``rm``."""
    batch, ranks, valid, index = comparison_batch(items, pad_token_id, max_length)
    device = next(rm.parameters()).device
    flat = scorer(items, batch) if scorer is not None else completion_scores(rm, items, batch)
    # An ensemble's members each train on their own loss (then their mean is the score);
    # the reported statistics are the mean's.
    members = flat if flat.dim() == 2 else flat.unsqueeze(0)  # (M, N)
    padded = torch.cat([members, members.new_zeros(members.shape[0], 1)], dim=1)  # slot N: padding reads 0
    rewards = padded[:, index.to(device)]  # (M, P, Kmax)
    losses = [batched_ranking_loss(r, ranks.to(device), valid.to(device))[0] for r in rewards]
    _, stats = batched_ranking_loss(rewards.mean(dim=0), ranks.to(device), valid.to(device))
    return torch.stack(losses).mean(), stats


def data_parallel_scorer(rm: RewardModel) -> Callable[..., torch.Tensor]:
    """``completion_scores`` on ``rm`` as one DDP replica across the ranks (``rm_step``'s ``scorer``)."""
    # DDP even under FSDP2: the RM's trunk is frozen and its states cached; only its top trains
    return distributed.wrap_data_parallel(rm, completion_scores, shard=False)


def completion_scores(rm: RewardModel, items: Sequence[EncodedComparison], batch) -> torch.Tensor:
    """Every completion's score, each ensemble member's: (M, N), or (N,) for a single head.
    ``batch``: ``comparison_batch(items, ...)``'s, read unless every item has cached trunk states."""
    device = next(rm.parameters()).device
    if all(item.trunk is not None for item in items):  # cached trunk: the top layers (or the head) only
        states = [s for item in items for s in item.trunk]
        lengths = [len(ids) for item in items for ids in item.completion_ids]
        return rm.scores_from_trunk(states, lengths, items[0].trunk_top_layers, members=True)
    return rm(batch.input_ids.to(device), batch.attention_mask.to(device), batch.response_mask.to(device),
              members=True)
