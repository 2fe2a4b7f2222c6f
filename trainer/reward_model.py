"""Step 2: the reward model, trained on K-way rankings.

``RewardModel`` is the policy's backbone (the causal LM without its LM head) plus a scalar
head read at each sequence's LAST non-pad token, plus a settable ``bias`` so that scores are
normalised (labeler demonstrations score mean 0). The PPO value model is a deep copy of it
and reads ``per_token_values``.

Training (``train_reward_model``) follows the paper: each prompt's K completions (K = 2..9)
are ONE batch element; every completion gets exactly one forward pass and all C(K, 2) pairs
enter the loss (``trainer.losses.batched_ranking_loss``), instead of two passes per pair.
Which weights train is ``RMConfig.train_mode``: ``full``, ``lora`` (merged before saving)
or ``top_layers``. In ``top_layers`` mode the frozen lower layers' output is computed once
per completion and reused in every epoch (``RMConfig.cache_trunk``): exact, since those
layers never change, and an epoch then costs the top layers only. The validation and bias
scoring read the same states, and a ``trainer.trunk_cache.TrunkCache`` passed in keeps them
for the next training on the same frozen trunk (the judge, the next cycle).

A saved RM is a folder: the backbone as a plain HF base model (``AutoModel``-loadable
``config.json`` + ``model.safetensors``), ``reward_head.safetensors`` (head weight, head
bias, score bias), ``reward_model.json`` and the tokenizer.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from common.models import load_causal_lm, load_tokenizer
from trainer.config import RMConfig
from trainer.data import Comparison, Demonstration, Messages, encode_response, pack_row, pack_sequences, render_prompt
from trainer.device import adapt_threads, num_threads, progress_enabled, resolve_device, resolve_dtype, seed_everything
from trainer.evaluate import eval_mode, pairwise_accuracy
from trainer.losses import batched_ranking_loss
from trainer.sft import build_optimizer, decoder_layers, training_dropout
from trainer.trunk_cache import TrunkCache, TrunkKey, trunk_key

RM_FORMAT = 1
RM_META = "reward_model.json"
RM_HEAD = "reward_head.safetensors"


class RewardModel(torch.nn.Module):
    """r(x, y) = head(h_last(x ++ y)) + bias, where h_last is the backbone's final hidden state
    at the last non-pad token (the response's EOS)."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int, head_init_std: float | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        std = head_init_std if head_init_std is not None else 1.0 / math.sqrt(hidden_size + 1)
        torch.nn.init.normal_(self.head.weight, std=std)
        torch.nn.init.zeros_(self.head.bias)
        # The ranking loss is blind to a constant; the bias is SET (normalisation), not learned.
        self.register_buffer("bias", torch.zeros(()))
        self.forward_calls = 0  # sequences through the backbone since creation (or reset)
        self.tokenizer: Any = None  # set by the constructors; saved alongside
        # Truncation used in training; score_texts applies it by default (saved in the json).
        self.max_length: int | None = None
        self.max_response_length: int | None = None
        # While set (``scoring_from_trunk``), score_texts reads the frozen trunk's states from
        # this cache and runs the top layers only.
        self.frozen_trunk: FrozenTrunk | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained_lm(
        cls, path: Path | str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
        head_init_std: float | None = None,
    ) -> RewardModel:
        """A fresh RM on the backbone of the causal LM in ``path`` (the SFT policy); small head init."""
        lm = load_causal_lm(path, dtype=dtype, device=device)
        backbone = lm.base_model  # LlamaForCausalLM.model: everything but the LM head
        rm = cls(backbone, lm.config.hidden_size, head_init_std).to(next(backbone.parameters()).device)
        rm.tokenizer = load_tokenizer(path, padding_side="right")
        return rm

    @classmethod
    def load(
        cls, path: Path | str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
    ) -> RewardModel:
        """Load a folder written by ``save`` (needs transformers, not the training code)."""
        from transformers import AutoModel

        folder = Path(path)
        meta = json.loads((folder / RM_META).read_text(encoding="utf-8"))
        if meta.get("format") != RM_FORMAT:
            raise ValueError(f"{folder}: unknown reward model format {meta.get('format')!r}")
        target = resolve_device(device)
        backbone = AutoModel.from_pretrained(folder, dtype=resolve_dtype(dtype, target), local_files_only=True)
        rm = cls(backbone, int(meta["hidden_size"]))
        head = load_file(str(folder / RM_HEAD))
        with torch.no_grad():
            rm.head.weight.copy_(head["weight"])
            rm.head.bias.copy_(head["bias"])
            rm.bias.copy_(head["score_bias"])
        rm.max_length, rm.max_response_length = meta.get("max_length"), meta.get("max_response_length")
        rm.tokenizer = load_tokenizer(folder, padding_side="right") if (folder / "tokenizer_config.json").exists() \
            else None
        return rm.to(target).eval()

    def save(self, path: Path | str) -> Path:
        """Write the folder ``load`` reads (backbone safetensors, head, bias, json, tokenizer)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if callable(getattr(backbone, "merge_and_unload", None)):  # LoRA mid-training: save merged weights
            backbone = copy.deepcopy(backbone).merge_and_unload()
        backbone.save_pretrained(folder)
        head = {"weight": self.head.weight.detach().float().cpu().contiguous(),
                "bias": self.head.bias.detach().float().cpu().contiguous(),
                "score_bias": self.bias.detach().float().cpu().contiguous()}
        save_file(head, str(folder / RM_HEAD))
        meta = {"format": RM_FORMAT, "hidden_size": self.head.in_features, "bias": float(self.bias),
                "backbone_class": type(backbone).__name__, "head_file": RM_HEAD,
                "max_length": self.max_length, "max_response_length": self.max_response_length,
                "reads": "final hidden state at the last non-pad token; score = head(h) + bias"}
        (folder / RM_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return folder

    # ------------------------------------------------------------------ scoring

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states. Shape: (B, T) -> (B, T, H). Counts B forward passes."""
        self.forward_calls += int(input_ids.shape[0])
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of right-padded sequences. Shape: input_ids, attention_mask (B, T) -> (B,) float32."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        last = attention_mask.sum(dim=1).long() - 1  # (B,) last non-pad token
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(h_last.float()).squeeze(-1) + self.bias  # (B,)

    def per_token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head (+ bias) at every position: V(s_t) for PPO. Shape: (B, T) -> (B, T) float32.

        At each row's last non-pad token this equals ``forward``; padding positions hold
        whatever the head gives there (mask them).
        """
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        return self.head(hidden.float()).squeeze(-1) + self.bias  # (B, T)

    @torch.no_grad()
    def trunk_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, top_layers: int) -> torch.Tensor:
        """Hidden states ENTERING the top ``top_layers`` decoder layers (what ``scores_from_trunk``
        continues from). Shape: (B, T) -> (B, T, H). Counts B forward passes."""
        self.forward_calls += int(input_ids.shape[0])
        layers = decoder_layers(self.backbone)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            output_hidden_states=True)
        return out.hidden_states[len(layers) - top_layers]  # [0] is the embeddings, [i] enters layer i

    def scores_from_trunk(self, states: torch.Tensor, attention_mask: torch.Tensor, top_layers: int) -> torch.Tensor:
        """``forward`` from ``trunk_states``: the top layers, the final norm and the head only.
        Shape: states (B, T, H), attention_mask (B, T) -> (B,) float32."""
        with only_top_layers(self.backbone, top_layers):
            hidden = self.backbone(inputs_embeds=states, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1).long() - 1
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h_last.float()).squeeze(-1) + self.bias

    @torch.no_grad()
    def score_texts(
        self, tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int = 16,
        max_length: int | None = None, max_response_length: int | None = None,
    ) -> torch.Tensor:
        """Scores of (prompt, response) texts, rendered as in training. Shape: -> (N,) float32 on CPU.

        ``max_length`` / ``max_response_length`` default to the truncation the RM was trained with.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        max_length = max_length if max_length is not None else self.max_length
        max_response_length = max_response_length if max_response_length is not None else self.max_response_length
        device = next(self.parameters()).device
        prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
        response_ids = [encode_response(tokenizer, r, max_response_length) for r in responses]
        if self.frozen_trunk is not None:
            rows = [pack_row(p, r, max_length) for p, r in zip(prompt_ids, response_ids)]
            return self.frozen_trunk.scores(self, rows, tokenizer.pad_token_id, batch_size)
        scores = []
        with eval_mode(self):
            for start in range(0, len(prompt_ids), batch_size):
                part = slice(start, start + batch_size)
                batch = pack_sequences(prompt_ids[part], response_ids[part], tokenizer.pad_token_id, max_length)
                scores.append(self(batch.input_ids.to(device), batch.attention_mask.to(device)).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def set_bias(self, value: float) -> None:
        with torch.no_grad():
            self.bias.fill_(value)


# ---------------------------------------------------------------------------- which weights train


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def configure_trainable(rm: RewardModel, mode: str, *, top_layers: int, lora_r: int, lora_alpha: int,
                        lora_dropout: float) -> None:
    """Set ``requires_grad`` (and wrap LoRA adapters) for ``mode``; the head always trains."""
    if mode == "full":
        rm.requires_grad_(True)
    elif mode == "top_layers":
        rm.requires_grad_(False)
        layers = decoder_layers(rm.backbone)
        if top_layers > len(layers):
            raise ValueError(f"top_layers={top_layers} but the backbone has {len(layers)} layers")
        for layer in layers[len(layers) - top_layers:]:
            layer.requires_grad_(True)
        norm = getattr(rm.backbone, "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
    elif mode == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is a declared dependency
            raise ImportError("train_mode='lora' needs peft: pip install 'peft>=0.21,<0.22'") from exc
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in rm.backbone.named_modules()
                          if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS})
        if not targets:
            raise ValueError("Unknown architecture: no linear layer to put LoRA adapters on")
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets)
        rm.backbone = get_peft_model(rm.backbone, lora)  # freezes the backbone, adapters train
    else:
        raise ValueError(f"Unknown train_mode: {mode}")
    rm.head.requires_grad_(True)


@contextlib.contextmanager
def only_top_layers(backbone: torch.nn.Module, top_layers: int) -> Iterator[None]:
    """Run ``backbone`` with its top ``top_layers`` decoder layers only (fed ``inputs_embeds`` =
    the states entering them): the model's own mask, positions and final norm still apply."""
    full = backbone.layers
    backbone.layers = torch.nn.ModuleList(list(full)[len(full) - top_layers:])
    try:
        yield
    finally:
        backbone.layers = full


@dataclass
class FrozenTrunk:
    """A trunk cache bound to one RM whose lower layers are frozen (its ``TrunkKey``, or None:
    kept for this training only)."""

    cache: TrunkCache
    key: TrunkKey | None
    top_layers: int

    def states(self, rm: RewardModel, rows: Sequence[Sequence[int]], pad_token_id: int, batch_size: int
               ) -> list[torch.Tensor]:
        return self.cache.states(rm, self.key, rows, self.top_layers, pad_token_id, batch_size)

    @torch.no_grad()
    def scores(self, rm: RewardModel, rows: Sequence[Sequence[int]], pad_token_id: int, batch_size: int
               ) -> torch.Tensor:
        """``forward``'s scores of token rows from cached trunk states. Shape: -> (N,) float32, CPU."""
        states = self.states(rm, rows, pad_token_id, batch_size)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of similar length
        scores = torch.zeros(len(rows))
        device = next(rm.parameters()).device
        with eval_mode(rm):
            for start in range(0, len(order), batch_size):
                part = order[start:start + batch_size]
                width = max(len(rows[i]) for i in part)
                padded = torch.stack([torch.nn.functional.pad(states[i], (0, 0, 0, width - len(rows[i])))
                                      for i in part])
                mask = torch.zeros((len(part), width), dtype=torch.long)
                for j, i in enumerate(part):
                    mask[j, :len(rows[i])] = 1
                scores[part] = rm.scores_from_trunk(padded.to(device), mask.to(device), self.top_layers).float().cpu()
        return scores


@contextlib.contextmanager
def scoring_from_trunk(rm: RewardModel, trunk: FrozenTrunk) -> Iterator[RewardModel]:
    """``rm.score_texts`` reads ``trunk`` inside the block (its lower layers must be the
    frozen ones the states came from)."""
    rm.frozen_trunk = trunk
    try:
        yield rm
    finally:
        rm.frozen_trunk = None


def can_cache_trunk(rm: RewardModel, config: RMConfig) -> bool:
    """The trunk is cached in top_layers mode without dropout, on a backbone whose forward
    loops over ``self.layers`` (Llama-style; others train uncached)."""
    return (config.cache_trunk and config.train_mode == "top_layers" and 0 < config.top_layers
            and config.residual_dropout == 0 and isinstance(getattr(rm.backbone, "layers", None), torch.nn.ModuleList))


def finish_training(rm: RewardModel) -> None:
    """Merge LoRA adapters into the backbone and make every weight trainable again (the PPO
    value model is a copy of this RM and trains all its weights)."""
    if callable(getattr(rm.backbone, "merge_and_unload", None)):
        rm.backbone = rm.backbone.merge_and_unload()
    rm.requires_grad_(True)


# ---------------------------------------------------------------------------- data


@dataclass
class EncodedComparison:
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    ranks: list[int]
    # Cached trunk output per completion, (length, H) as packed (``attach_trunk_states``), or
    # None; the states enter the top ``trunk_top_layers`` decoder layers.
    trunk: list[torch.Tensor] | None = None
    trunk_top_layers: int = 0


def attach_trunk_states(rm: RewardModel, items: Sequence[EncodedComparison], trunk: FrozenTrunk, pad_token_id: int,
                        max_length: int | None, max_sequences: int) -> None:
    """Give each completion its trunk output (from ``trunk``'s cache, or computed there with
    no grad in batches of at most ``max_sequences`` rows) and keep it on the item."""
    rows = [pack_row(item.prompt_ids, ids, max_length) for item in items for ids in item.completion_ids]
    states = iter(trunk.states(rm, rows, pad_token_id, max_sequences))
    for item in items:
        item.trunk = [next(states) for _ in item.completion_ids]
        item.trunk_top_layers = trunk.top_layers


def encode_comparisons(tokenizer: Any, comparisons: Sequence[Comparison], max_response_length: int
                       ) -> list[EncodedComparison]:
    """Token ids per comparison; the prompt is rendered once for its K completions."""
    return [EncodedComparison(render_prompt(tokenizer, c.messages),
                              [encode_response(tokenizer, text, max_response_length) for text in c.completions],
                              list(c.ranks))
            for c in comparisons]


def has_ordered_pair(comparison: Comparison) -> bool:
    return len(set(comparison.ranks)) > 1


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


def kway_loss(rm: RewardModel, items: Sequence[EncodedComparison], pad_token_id: int, max_length: int | None):
    """The paper's loss for P prompts with ONE forward pass per completion; returns (loss, stats).
    Items with cached trunk states (``attach_trunk_states``) run the top layers only."""
    batch, ranks, valid, index = comparison_batch(items, pad_token_id, max_length)
    device = next(rm.parameters()).device
    if all(item.trunk is not None for item in items):  # cached trunk: the top layers only
        states = [s for item in items for s in item.trunk]
        width = batch.input_ids.shape[1]
        padded_states = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[0])) for s in states])
        flat = rm.scores_from_trunk(padded_states.to(device), batch.attention_mask.to(device),
                                    items[0].trunk_top_layers)
    else:
        flat = rm(batch.input_ids.to(device), batch.attention_mask.to(device))  # (N,)
    padded = torch.cat([flat, flat.new_zeros(1)])  # slot N: padding completions read 0
    rewards = padded[index.to(device)]  # (P, Kmax)
    return batched_ranking_loss(rewards, ranks.to(device), valid.to(device))


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
    rm = _load_rm(model_dir_or_rm, config)
    tokenizer = rm.tokenizer
    if tokenizer is None:
        raise ValueError("the reward model has no tokenizer; load it with from_pretrained_lm or load")
    usable = [c for c in comparisons if has_ordered_pair(c)]
    if not usable:
        raise ValueError("no comparison with an ordered pair to train on")
    train = encode_comparisons(tokenizer, usable, config.max_response_length)
    rm.max_length, rm.max_response_length = config.max_length, config.max_response_length
    configure_trainable(rm, config.train_mode, top_layers=config.top_layers, lora_r=config.lora_r,
                        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
    calls_before = rm.forward_calls
    adapt_threads(config.num_threads)
    cached = can_cache_trunk(rm, config)
    trunk = None
    if cached:  # the frozen layers' output, once for all epochs (and for scoring below)
        shared = trunk_cache is not None and not isinstance(model_dir_or_rm, RewardModel)
        key = trunk_key(model_dir_or_rm, config.top_layers, rm) if shared else None
        trunk = FrozenTrunk(trunk_cache if shared else TrunkCache(), key, config.top_layers)
        reused_before, computed_before = trunk.cache.reused, trunk.cache.computed
        attach_trunk_states(rm, train, trunk, tokenizer.pad_token_id, config.max_length,
                            config.max_completions_per_step)
    result = RMResult(str(out_dir), config.train_mode, trunk_cached=cached, num_train=len(usable),
                      num_val=len(val_comparisons),
                      skipped_all_tied=len(comparisons) - len(usable),
                      trainable_params=sum(p.numel() for p in rm.parameters() if p.requires_grad),
                      total_params=sum(p.numel() for p in rm.parameters()))

    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    optimizer, schedule = build_optimizer(
        list(rm.named_parameters()), config.learning_rate, config.weight_decay,
        (config.adam_beta1, config.adam_beta2), steps_per_epoch * config.epochs, config.warmup_ratio,
        config.min_lr_ratio)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=steps_per_epoch * config.epochs, desc=f"rm ({config.train_mode})",
               disable=not progress_enabled(config.show_progress))
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        threads = adapt_threads(config.num_threads)
        order = torch.randperm(len(train), generator=generator).tolist()
        with training_dropout(rm.backbone, config.residual_dropout):
            metrics = _train_epoch(rm, [train[i] for i in order], optimizer, schedule, config,
                                   tokenizer.pad_token_id, bar)
        result.epochs.append({"epoch": epoch, **metrics, "seconds": time.perf_counter() - epoch_started,
                              "threads": threads})
    bar.close()
    result.forward_passes = rm.forward_calls - calls_before
    finish_training(rm)
    adapt_threads(config.num_threads)
    # The lower layers are still the frozen ones: validation and bias read the same trunk.
    with scoring_from_trunk(rm, trunk) if trunk is not None else contextlib.nullcontext():
        result.val = pairwise_accuracy(rm, tokenizer, val_comparisons, batch_size=config.eval_batch_size)
        result.bias_source, result.bias_reference_mean = normalise_bias(
            rm, tokenizer, demonstrations, bias_prompts, batch_size=config.eval_batch_size)
    if trunk is not None:
        result.trunk_reused = trunk.cache.reused - reused_before
        result.trunk_computed = trunk.cache.computed - computed_before
    result.bias = float(rm.bias)
    rm.save(out_dir)
    result.seconds = time.perf_counter() - started
    return result


def _load_rm(model_dir_or_rm: Path | str | RewardModel, config: RMConfig) -> RewardModel:
    if isinstance(model_dir_or_rm, RewardModel):
        return model_dir_or_rm
    device = resolve_device(config.device)
    return RewardModel.from_pretrained_lm(model_dir_or_rm, dtype=resolve_dtype(config.dtype, device), device=device,
                                          head_init_std=config.head_init_std)


def _train_epoch(rm: RewardModel, items: list[EncodedComparison], optimizer, schedule, config: RMConfig,
                 pad_id: int, bar) -> dict[str, float]:
    """One pass over the comparisons; returns mean step loss and pooled pair accuracy."""
    rm.train()
    losses, right, pairs = [], 0.0, 0.0
    for start in range(0, len(items), config.batch_size):
        step = items[start:start + config.batch_size]
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for group in micro_batches(step, config.max_completions_per_step):
            loss, stats = kway_loss(rm, group, pad_id, config.max_length)
            # Each prompt weighs the same in the step's mean, whatever micro-batch it sits in.
            weighted = loss * (len(group) / len(step))
            weighted.backward()
            step_loss += float(weighted.detach())
            right += float(stats.accuracy) * float(stats.num_pairs)
            pairs += float(stats.num_pairs)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in rm.parameters() if p.requires_grad], config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    rm.eval()
    return {"train_loss": sum(losses) / len(losses), "train_accuracy": right / max(pairs, 1.0),
            "steps": len(losses), "lr_end": schedule.get_last_lr()[0]}


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
