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
from trainer.lora import add_lora
from trainer.losses import batched_ranking_loss
from trainer.rm_heads import HeadEnsemble, build_head, gather_last, member_count
from trainer.sft import build_optimizer, decoder_layers, training_dropout
from trainer.trunk_cache import TrunkCache, TrunkKey, trunk_key

RM_FORMAT = 2  # 1: a last-token linear head only (still read)
RM_META = "reward_model.json"
RM_HEAD = "reward_head.safetensors"


class RewardModel(torch.nn.Module):
    """r(x, y) = head(final hidden states of x ++ y) + bias. The head (``trainer.rm_heads``)
    reads the last non-pad token (the response's EOS when the policy stopped) and, for the
    pooled head, every response token."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int, head: torch.nn.Module | None = None,
                 pool_layer: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden_size = hidden_size
        self.head = head if head is not None else build_head("last_token", hidden_size)
        # Which hidden states the head's token pools read: index into the backbone's
        # hidden_states (0 = embeddings, i = the output of layer i); None = the final states.
        self.pool_layer = pool_layer if self.head.reads_tokens else None
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

    @property
    def head_kind(self) -> str:
        return self.head.kind

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained_lm(
        cls, path: Path | str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
        head_init_std: float | None = None, head: str = "last_token", head_features: int = 16,
        pool_depth: float = 1.0, head_ensemble: int = 1,
    ) -> RewardModel:
        """A fresh RM on the backbone of the causal LM in ``path`` (the SFT policy); small head init.
        ``pool_depth``: where the pooled head's token states come from, as a fraction of the
        depth (0 = embeddings, 1 = the final states)."""
        lm = load_causal_lm(path, dtype=dtype, device=device)
        backbone = lm.base_model  # LlamaForCausalLM.model: everything but the LM head
        hidden = lm.config.hidden_size
        new_head = build_head(head, hidden, features=head_features, init_std=head_init_std, ensemble=head_ensemble)
        layers = len(decoder_layers(backbone))
        pool_layer = None if pool_depth >= 1.0 else round(pool_depth * layers)
        rm = cls(backbone, hidden, new_head, pool_layer).to(next(backbone.parameters()).device)
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
        if meta.get("format") not in (1, RM_FORMAT):
            raise ValueError(f"{folder}: unknown reward model format {meta.get('format')!r}")
        target = resolve_device(device)
        backbone = AutoModel.from_pretrained(folder, dtype=resolve_dtype(dtype, target), local_files_only=True)
        hidden = int(meta["hidden_size"])
        stored = load_file(str(folder / RM_HEAD))
        score_bias = stored.pop("score_bias")
        if meta["format"] == 1:  # a bare linear head: weight, bias
            stored = {"linear.weight": stored["weight"], "linear.bias": stored["bias"]}
        head = build_head(meta.get("head", "last_token"), hidden, features=int(meta.get("head_features") or 16),
                          ensemble=int(meta.get("head_ensemble") or 1))
        head.load_state_dict(stored)
        rm = cls(backbone, hidden, head, meta.get("pool_layer"))
        with torch.no_grad():
            rm.bias.copy_(score_bias)
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
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in self.head.state_dict().items()}
        tensors["score_bias"] = self.bias.detach().float().cpu().contiguous()
        save_file(tensors, str(folder / RM_HEAD))
        meta = {"format": RM_FORMAT, "hidden_size": self.hidden_size, "bias": float(self.bias),
                "head": self.head_kind, "head_features": head_features(self.head),
                "head_ensemble": member_count(self.head),
                "pool_layer": self.pool_layer,
                "backbone_class": type(backbone).__name__, "head_file": RM_HEAD,
                "max_length": self.max_length, "max_response_length": self.max_response_length,
                "reads": "final hidden states; score = head(states, masks) + bias (trainer.rm_heads)"}
        (folder / RM_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return folder

    # ------------------------------------------------------------------ scoring

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states. Shape: (B, T) -> (B, T, H). Counts B forward passes."""
        return self.head_states(input_ids, attention_mask)[1]

    def head_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states the head pools, final states). Shape: (B, T) -> two (B, T, H), float32.
        Counts B forward passes."""
        self.forward_calls += int(input_ids.shape[0])
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            output_hidden_states=self.pool_layer is not None)
        final = out.last_hidden_state.float()
        tokens = final if self.pool_layer is None else out.hidden_states[self.pool_layer].float()
        return tokens, final

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None, members: bool = False) -> torch.Tensor:
        """Scores of right-padded sequences. Shape: input_ids, attention_mask, response_mask
        (B, T) -> (B,) float32; ``members``: each ensemble member's, (M, B). The pooled head
        needs ``response_mask`` (1 on response tokens)."""
        tokens, final = self.head_states(input_ids, attention_mask)  # (B, T, H) each
        head = self.head.member_scores if members and isinstance(self.head, HeadEnsemble) else self.head
        return head(tokens, gather_last(final, attention_mask), response_mask) + self.bias

    def per_token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """V(s_t) for PPO: the score as if the response ended at t. Shape: (B, T) -> (B, T) float32.

        At each row's last non-pad token this equals ``forward``; padding positions hold
        whatever the head gives there (mask them).
        """
        tokens, final = self.head_states(input_ids, attention_mask)  # (B, T, H) each
        return self.head.per_token(tokens, final, response_mask) + self.bias  # (B, T)

    @torch.no_grad()
    def trunk_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, top_layers: int) -> list[torch.Tensor]:
        """Per row, what training above a frozen trunk needs (what ``scores_from_trunk`` reads):
        the states ENTERING the top ``top_layers`` decoder layers, (len, H); with 0 (the head
        alone) the head's token states followed by the final state at the last token, (len + 1, H).
        Shape: (B, T) -> B tensors. Counts B forward passes."""
        lengths = attention_mask.sum(dim=1).tolist()
        if top_layers == 0:
            tokens, final = self.head_states(input_ids, attention_mask)
            return [torch.cat([tokens[i, :n], final[i, n - 1:n]]) for i, n in enumerate(lengths)]
        self.forward_calls += int(input_ids.shape[0])
        layers = decoder_layers(self.backbone)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            output_hidden_states=True)
        states = out.hidden_states[len(layers) - top_layers]  # [0] is the embeddings, [i] enters layer i
        return [states[i, :n] for i, n in enumerate(lengths)]

    @torch.no_grad()
    def trunk_rows_after_prefix(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]], top_layers: int
                                ) -> list[torch.Tensor]:
        """``trunk_rows`` of the rows ``prefix ++ continuations[i]``, with the shared prefix (a
        prompt's K completions share it) run ONCE and its keys and values reused by every row:
        a row then costs its own tokens only. Equal to ``trunk_rows`` up to float rounding
        (~2e-6). Counts one forward pass per row."""
        device = next(self.parameters()).device
        self.forward_calls += len(continuations)
        hidden_index = None if top_layers == 0 else len(decoder_layers(self.backbone)) - top_layers
        head = self.backbone(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True,
                             output_hidden_states=True)
        cache = head.past_key_values
        cache.batch_repeat_interleave(len(continuations))
        width, start = max(len(c) for c in continuations), len(prefix)
        input_ids = torch.zeros((len(continuations), max(width, 1)), dtype=torch.long)
        attention_mask = torch.zeros((len(continuations), start + max(width, 1)), dtype=torch.long)
        attention_mask[:, :start] = 1
        for i, c in enumerate(continuations):
            input_ids[i, :len(c)] = torch.tensor(list(c), dtype=torch.long)
            attention_mask[i, start:start + len(c)] = 1
        positions = (start + torch.arange(input_ids.shape[1])).expand(len(continuations), -1)
        tail = self.backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                             output_hidden_states=True)
        rows = []
        for i, c in enumerate(continuations):
            n = len(c)
            if hidden_index is not None:  # the states entering the top layers
                rows.append(torch.cat([head.hidden_states[hidden_index][0], tail.hidden_states[hidden_index][i, :n]]))
                continue
            layer = -1 if self.pool_layer is None else self.pool_layer
            tokens = torch.cat([head.hidden_states[layer][0], tail.hidden_states[layer][i, :n]]).float()
            last = (tail.last_hidden_state[i, n - 1] if n else head.last_hidden_state[0, -1]).float()
            rows.append(torch.cat([tokens, last[None]]))
        return rows

    def scores_from_trunk(self, rows: Sequence[torch.Tensor], response_lengths: Sequence[int], top_layers: int,
                          members: bool = False) -> torch.Tensor:
        """``forward``'s scores from ``trunk_rows``: the top layers, the final norm and the head
        (the head alone when ``top_layers`` is 0). Each row's last ``response_lengths[i]``
        tokens are its response. Shape: -> (N,) float32; ``members``: each ensemble member's, (M, N)."""
        device = next(self.parameters()).device
        head = self.head.member_scores if members and isinstance(self.head, HeadEnsemble) else self.head
        if top_layers == 0:
            tokens, _, response_mask = pad_states([r[:-1] for r in rows], response_lengths)
            last = torch.stack([r[-1] for r in rows])
            return head(tokens.to(device), last.to(device), response_mask.to(device)) + self.bias
        states, attention_mask, response_mask = pad_states(rows, response_lengths)
        attention_mask = attention_mask.to(device)
        with only_top_layers(self.backbone, top_layers):
            final = self.backbone(inputs_embeds=states.to(device), attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state.float()
        # a pooled head above trained top layers reads the final states (can_cache_trunk)
        return head(final, gather_last(final, attention_mask), response_mask.to(device)) + self.bias

    @torch.no_grad()
    def score_texts(
        self, tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int = 16,
        max_length: int | None = None, max_response_length: int | None = None,
        stopped: Sequence[bool] | None = None,
    ) -> torch.Tensor:
        """Scores of (prompt, response) texts, rendered as in training. Shape: -> (N,) float32 on CPU.

        ``stopped[i]`` False: response i was cut at its token budget and gets no EOS, as the
        policy left it (default: every response ended with EOS). ``max_length`` /
        ``max_response_length`` default to the truncation the RM was trained with.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        max_length = max_length if max_length is not None else self.max_length
        max_response_length = max_response_length if max_response_length is not None else self.max_response_length
        stopped = [True] * len(responses) if stopped is None else list(stopped)
        device = next(self.parameters()).device
        prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
        response_ids = [encode_response(tokenizer, r, max_response_length, eos=s) for r, s in zip(responses, stopped)]
        if self.frozen_trunk is not None:
            rows = [pack_row(p, r, max_length) for p, r in zip(prompt_ids, response_ids)]
            return self.frozen_trunk.scores(self, rows, [len(r) for r in response_ids], tokenizer.pad_token_id,
                                            batch_size)
        scores = []
        with eval_mode(self):
            for start in range(0, len(prompt_ids), batch_size):
                part = slice(start, start + batch_size)
                batch = pack_sequences(prompt_ids[part], response_ids[part], tokenizer.pad_token_id, max_length)
                scores.append(self(batch.input_ids.to(device), batch.attention_mask.to(device),
                                   batch.response_mask.to(device)).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def set_bias(self, value: float) -> None:
        with torch.no_grad():
            self.bias.fill_(value)


# ---------------------------------------------------------------------------- which weights train


def configure_trainable(rm: RewardModel, mode: str, *, top_layers: int, lora_r: int, lora_alpha: int,
                        lora_dropout: float) -> None:
    """Set ``requires_grad`` (and wrap LoRA adapters) for ``mode``; the head always trains."""
    if mode == "full":
        rm.requires_grad_(True)
    elif mode == "head":
        rm.requires_grad_(False)  # the whole trunk is frozen: only the head below trains
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
        rm.backbone = add_lora(rm.backbone, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)  # freezes the rest
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

    def states(self, rm: RewardModel, rows: Sequence[Sequence[int]], pad_token_id: int, batch_size: int,
               prefix_lengths: Sequence[int] | None = None) -> list[torch.Tensor]:
        return self.cache.states(rm, self.key, rows, self.top_layers, pad_token_id, batch_size, prefix_lengths)

    @torch.no_grad()
    def scores(self, rm: RewardModel, rows: Sequence[Sequence[int]], response_lengths: Sequence[int],
               pad_token_id: int, batch_size: int) -> torch.Tensor:
        """``forward``'s scores of token rows (each ending with its response of
        ``response_lengths[i]`` tokens) from cached trunk states. Shape: -> (N,) float32, CPU."""
        states = self.states(rm, rows, pad_token_id, batch_size,
                             [len(row) - n for row, n in zip(rows, response_lengths)])
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of similar length
        scores = torch.zeros(len(rows))
        with eval_mode(rm):
            for start in range(0, len(order), batch_size):
                part = order[start:start + batch_size]
                scores[part] = rm.scores_from_trunk([states[i] for i in part], [response_lengths[i] for i in part],
                                                    self.top_layers).float().cpu()
        return scores


def pad_states(states: Sequence[torch.Tensor], response_lengths: Sequence[int], width: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad per-row states, (len_i, H) each, to one batch with its masks; a row's last
    ``response_lengths[i]`` positions are its response. Returns states (B, W, H),
    attention_mask (B, W) long, response_mask (B, W) float."""
    width = width if width is not None else max(s.shape[0] for s in states)
    padded = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[0])) for s in states])
    attention_mask = torch.zeros((len(states), width), dtype=torch.long)
    response_mask = torch.zeros((len(states), width))
    for i, (s, n) in enumerate(zip(states, response_lengths)):
        attention_mask[i, :s.shape[0]] = 1
        response_mask[i, s.shape[0] - n:s.shape[0]] = 1
    return padded, attention_mask, response_mask


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
    """The trunk is cached in ``head`` mode (all of it frozen) and in top_layers mode without
    dropout on a backbone whose forward loops over ``self.layers`` (Llama-style; others
    train uncached)."""
    if not config.cache_trunk:
        return False
    if config.train_mode == "head":
        return True
    # a head that pools a lower layer's states needs them, and only the top layers' input is cached
    return (config.train_mode == "top_layers" and 0 < config.top_layers and config.residual_dropout == 0
            and rm.pool_layer is None and isinstance(getattr(rm.backbone, "layers", None), torch.nn.ModuleList))


def frozen_top_layers(config: RMConfig) -> int:
    """How many top decoder layers train above a cached trunk (0: the head alone)."""
    return 0 if config.train_mode == "head" else config.top_layers


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
    completion_ids: list[list[int]]  # EOS-terminated when the policy stopped
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
    prompts = [len(row) - len(ids) for row, ids in zip(rows, (ids for item in items for ids in item.completion_ids))]
    states = iter(trunk.states(rm, rows, pad_token_id, max_sequences, prompts))
    for item in items:
        item.trunk = [next(states) for _ in item.completion_ids]
        item.trunk_top_layers = trunk.top_layers


def encode_comparisons(tokenizer: Any, comparisons: Sequence[Comparison], max_response_length: int
                       ) -> list[EncodedComparison]:
    """Token ids per comparison; the prompt is rendered once for its K completions. A
    completion the policy did not finish gets no EOS (``Comparison.stopped``)."""
    return [EncodedComparison(render_prompt(tokenizer, c.messages),
                              [encode_response(tokenizer, text, max_response_length, eos=stopped)
                               for text, stopped in zip(c.completions, c.stopped or [True] * len(c.completions))],
                              list(c.ranks))
            for c in comparisons]


def head_features(head: torch.nn.Module) -> int | None:
    """The pooled head's projection count (None for the last-token head)."""
    member = head.members[0] if isinstance(head, HeadEnsemble) else head
    return member.proj.out_features if hasattr(member, "proj") else None


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


def kway_loss(rm: RewardModel, items: Sequence[EncodedComparison], pad_token_id: int, max_length: int | None):
    """The paper's loss for P prompts with ONE forward pass per completion; returns (loss, stats).
    Items with cached trunk states (``attach_trunk_states``) run the top layers only."""
    batch, ranks, valid, index = comparison_batch(items, pad_token_id, max_length)
    device = next(rm.parameters()).device
    if all(item.trunk is not None for item in items):  # cached trunk: the top layers (or the head) only
        states = [s for item in items for s in item.trunk]
        lengths = [len(ids) for item in items for ids in item.completion_ids]
        flat = rm.scores_from_trunk(states, lengths, items[0].trunk_top_layers, members=True)
    else:
        flat = rm(batch.input_ids.to(device), batch.attention_mask.to(device), batch.response_mask.to(device),
                  members=True)
    # An ensemble's members each train on their own loss (then their mean is the score);
    # the reported statistics are the mean's.
    members = flat if flat.dim() == 2 else flat.unsqueeze(0)  # (M, N)
    padded = torch.cat([members, members.new_zeros(members.shape[0], 1)], dim=1)  # slot N: padding reads 0
    rewards = padded[:, index.to(device)]  # (M, P, Kmax)
    losses = [batched_ranking_loss(r, ranks.to(device), valid.to(device))[0] for r in rewards]
    _, stats = batched_ranking_loss(rewards.mean(dim=0), ranks.to(device), valid.to(device))
    return torch.stack(losses).mean(), stats


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
    trunk = bind_trunk(rm, model_dir_or_rm, config, trunk_cache)
    if trunk is not None:  # the frozen layers' output, once for all epochs (and for scoring below)
        reused_before, computed_before = trunk.cache.reused, trunk.cache.computed
        attach_trunk_states(rm, train, trunk, tokenizer.pad_token_id, config.max_length,
                            config.max_completions_per_step)
    before_normalizer = rm.forward_calls
    fit_head_normalizer(rm, train, tokenizer.pad_token_id, config.max_length, config.max_completions_per_step)
    calls_before += rm.forward_calls - before_normalizer  # not training passes
    result = RMResult(str(out_dir), config.train_mode, trunk_cached=trunk is not None, num_train=len(usable),
                      num_val=len(val_comparisons), skipped_all_tied=len(comparisons) - len(usable),
                      trainable_params=sum(p.numel() for p in rm.parameters() if p.requires_grad),
                      total_params=sum(p.numel() for p in rm.parameters()), head=rm.head_kind,
                      num_train_pairs=sum(ordered_pairs(c.ranks) for c in usable))
    result.epochs = fit_epochs(rm, train, config, tokenizer.pad_token_id)
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
                                          head_init_std=config.head_init_std, head=config.head,
                                          head_features=config.head_features, pool_depth=config.pool_depth,
                                          head_ensemble=config.head_ensemble)


def bind_trunk(rm: RewardModel, model_dir_or_rm: Path | str | RewardModel, config: RMConfig,
               trunk_cache: TrunkCache | None) -> FrozenTrunk | None:
    """The cache the frozen trunk's states come from: the shared one when the trunk is a
    model folder (its content hash is the key), else one for this training; None when
    ``can_cache_trunk`` says no."""
    if not can_cache_trunk(rm, config):
        return None
    top = frozen_top_layers(config)
    shared = trunk_cache is not None and not isinstance(model_dir_or_rm, RewardModel)
    key = trunk_key(model_dir_or_rm, top, rm) if shared else None
    return FrozenTrunk(trunk_cache if shared else TrunkCache(), key, top)


@torch.no_grad()
def fit_head_normalizer(rm: RewardModel, items: Sequence[EncodedComparison], pad_token_id: int,
                        max_length: int | None, max_sequences: int, max_rows: int = 512) -> None:
    """Fix the head's input standardisation from (up to ``max_rows``) training completions:
    the response tokens' states it pools and the last tokens' final states (from the cached
    trunk when only the head trains)."""
    if not rm.head.reads_tokens:
        return
    device = next(rm.parameters()).device
    tokens, lasts, rows = [], [], 0
    for group in micro_batches(list(items), max_sequences):
        lengths = [len(ids) for item in group for ids in item.completion_ids]
        if all(item.trunk is not None and item.trunk_top_layers == 0 for item in group):
            for states, n in zip((s for item in group for s in item.trunk), lengths):
                tokens.append(states[-1 - n:-1])  # (n, H): the response's token states
                lasts.append(states[-1:])  # (1, H): the final state at the last token
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


def fit_epochs(rm: RewardModel, train: list[EncodedComparison], config: RMConfig, pad_id: int
               ) -> list[dict[str, Any]]:
    """``config.epochs`` shuffled passes under AdamW with cosine decay; per-epoch metrics."""
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
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
            metrics = _train_epoch(rm, [train[i] for i in order], optimizer, schedule, config, pad_id, bar)
        epochs.append({"epoch": epoch, **metrics, "seconds": time.perf_counter() - epoch_started, "threads": threads})
    bar.close()
    return epochs


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
