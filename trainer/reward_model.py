"""Step 2's model: the reward model, its scoring and its file format.

``RewardModel`` is the policy's backbone (the causal LM without its LM head) plus a scalar
head read at each sequence's LAST non-pad token, plus a settable ``bias`` so that scores are
normalised (labeler demonstrations score mean 0). The PPO value model is a deep copy of it
and reads ``per_token_values``. A pooled head that reads no final state (``last_state``
False) reads nothing above its deepest pooled layer, so the backbone is CUT there
(``cut_backbone``): the upper layers are neither run nor saved (SmolLM2: 12 of 30 layers).

Training it on K-way rankings is ``trainer.rm_training``; the frozen trunk's states, cached
once per completion for every epoch and for the scoring after training, are
``trainer.trunk_cache`` (``trunk_rows`` computes them here, ``scores_from_trunk`` reads them).

A saved RM is a folder: the backbone as a plain HF base model (``AutoModel``-loadable
``config.json`` + ``model.safetensors``), ``reward_head.safetensors`` (head weight, head
bias, score bias), ``reward_model.json`` and the tokenizer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.chat import render_chat_ids
from common.models import load_causal_lm, load_tokenizer, resolve_dtype
from trainer.data import encode_response, pack_row, pack_sequences
from trainer.device import resolve_device
from trainer.examples import Messages
from trainer.rm_heads import HeadEnsemble, build_head, gather_last, member_count
from trainer.torch_parts import decoder_layers, eval_mode, right_pad
from trainer.trunk_cache import FrozenTrunk, only_top_layers, pad_states

RM_FORMAT = 2  # 1: a last-token linear head only (still read)
RM_META = "reward_model.json"
RM_HEAD = "reward_head.safetensors"


class RewardModel(torch.nn.Module):
    """r(x, y) = head(final hidden states of x ++ y) + bias. The head (``trainer.rm_heads``)
    reads the last non-pad token (the response's EOS when the policy stopped) and, for the
    pooled head, every response token."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int, head: torch.nn.Module | None = None,
                 pool_layers: Sequence[int] | None = None, cut_at: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden_size = hidden_size
        self.head = head if head is not None else build_head("last_token", hidden_size)
        # Which hidden states the head's token pools read, concatenated per token: indices into
        # the backbone's hidden_states (0 = embeddings, i = the output of layer i); None = the
        # final states.
        self.pool_layers = tuple(pool_layers) if self.head.reads_tokens and pool_layers is not None else None
        # ``cut_at``: the backbone keeps its first cut_at decoder layers and no final norm
        # (``cut_backbone``); the norm taken out is kept in a list (not a registered submodule)
        # for ``save``, which puts it back so that the folder loads as a plain model.
        self.cut_at = cut_at
        self._cut_norm: list[torch.nn.Module] = [] if cut_at is None else [cut_backbone(backbone, cut_at)]
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
        pool_depths: Sequence[float] = (1.0,), head_ensemble: int = 1, head_last_state: bool = True,
    ) -> RewardModel:
        """A fresh RM on the backbone of the causal LM in ``path`` (the SFT policy); small head init.
        ``pool_depths``: where the pooled head's token states come from, as fractions of the
        depth (0 = embeddings, 1 = the final states), concatenated per token; ``head_last_state``
        False: the pooled head reads those alone (and the backbone is cut above them)."""
        lm = load_causal_lm(path, dtype=dtype, device=device)
        backbone = lm.base_model  # LlamaForCausalLM.model: everything but the LM head
        hidden = lm.config.hidden_size
        layers = len(decoder_layers(backbone))
        pool_layers = None if tuple(pool_depths) == (1.0,) else tuple(round(d * layers) for d in pool_depths)
        new_head = build_head(head, hidden, features=head_features, init_std=head_init_std, ensemble=head_ensemble,
                              token_size=pooled_width(hidden, pool_layers), last_state=head_last_state)
        # nothing above the deepest pooled layer is read (the final layer's pooled states are
        # the normed ones, so a head pooling it keeps the whole backbone)
        whole = new_head.reads_final or pool_layers is None or max(pool_layers) == layers
        cut_at = None if whole else max(pool_layers)
        rm = cls(backbone, hidden, new_head, pool_layers, cut_at).to(next(backbone.parameters()).device)
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
        pool_layers = meta.get("pool_layers")
        if pool_layers is None and meta.get("pool_layer") is not None:  # written before several layers pooled
            pool_layers = [meta["pool_layer"]]
        stored = load_file(str(folder / RM_HEAD))
        score_bias = stored.pop("score_bias")
        if meta["format"] == 1:  # a bare linear head: weight, bias
            stored = {"linear.weight": stored["weight"], "linear.bias": stored["bias"]}
        head = build_head(meta.get("head", "last_token"), hidden, features=int(meta.get("head_features") or 16),
                          ensemble=int(meta.get("head_ensemble") or 1), token_size=pooled_width(hidden, pool_layers),
                          last_state=bool(meta.get("head_last_state", True)))
        head.load_state_dict(stored)
        rm = cls(backbone, hidden, head, pool_layers, meta.get("cut_at"))
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
        if self._cut_norm:  # a cut backbone saves as a plain model of its kept layers
            weight = next(backbone.parameters())
            identity, backbone.norm = backbone.norm, self._cut_norm[0].to(weight.device, weight.dtype)
            try:
                backbone.save_pretrained(folder)
            finally:
                backbone.norm = identity
        else:
            backbone.save_pretrained(folder)
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in self.head.state_dict().items()}
        tensors["score_bias"] = self.bias.detach().float().cpu().contiguous()
        save_file(tensors, str(folder / RM_HEAD))
        meta = {"format": RM_FORMAT, "hidden_size": self.hidden_size, "bias": float(self.bias),
                "head": self.head_kind, "head_features": head_features(self.head),
                "head_ensemble": member_count(self.head), "head_last_state": bool(self.head.reads_final),
                "cut_at": self.cut_at,
                "pool_layers": None if self.pool_layers is None else list(self.pool_layers),
                "backbone_class": type(backbone).__name__, "head_file": RM_HEAD,
                "max_length": self.max_length, "max_response_length": self.max_response_length,
                "reads": "hidden states (the final ones unless head_last_state is false); "
                         "score = head(states, masks) + bias (trainer.rm_heads)"}
        (folder / RM_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return folder

    # ------------------------------------------------------------------ scoring

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states. Shape: (B, T) -> (B, T, H). Counts B forward passes."""
        return self.head_states(input_ids, attention_mask)[1]

    def head_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states the head pools, final states: the backbone's output, which for a cut
        backbone is the deepest pooled layer's, not read). Shape: (B, T) -> (B, T, H *
        len(pool_layers)) and (B, T, H), float32. Counts B forward passes."""
        out = self._backbone_pass(input_ids, attention_mask, every_layer=self.pool_layers is not None)
        final = out.last_hidden_state.float()
        if self.pool_layers is None:
            return final, final
        return torch.cat([out.hidden_states[layer].float() for layer in self.pool_layers], dim=-1), final

    def _backbone_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, every_layer: bool) -> Any:
        """The backbone's output on a right-padded batch (with ``every_layer``, every layer's
        hidden states too). Shape: (B, T) -> last_hidden_state (B, T, H). Counts B forward passes."""
        self.forward_calls += int(input_ids.shape[0])
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             output_hidden_states=every_layer)

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
            tokens, final = self.head_states(input_ids, attention_mask)  # (B, T, D), (B, T, H)
            last = gather_last(final, attention_mask)  # (B, H)
            return [self._head_row(tokens[i, :n], last[i]) for i, n in enumerate(lengths)]
        layers = decoder_layers(self.backbone)
        out = self._backbone_pass(input_ids, attention_mask, every_layer=True)
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
        start = len(prefix)
        width = max(1, max(len(c) for c in continuations))  # all empty: one pad position still runs
        input_ids, tail_mask = right_pad([torch.tensor(list(c), dtype=torch.long) for c in continuations], 0, width)
        prefix_mask = torch.ones((len(continuations), start), dtype=torch.long)
        attention_mask = torch.cat([prefix_mask, tail_mask], dim=1)  # (N, start + W)
        positions = (start + torch.arange(input_ids.shape[1])).expand(len(continuations), -1)
        tail = self.backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                             output_hidden_states=True)
        def joined(prefix_states: torch.Tensor, tail_states: torch.Tensor, i: int) -> torch.Tensor:
            """Row i's states: the prefix's, then its own continuation's. Shape: -> (start + n_i, H)."""
            return torch.cat([prefix_states[0], tail_states[i, :len(continuations[i])]])

        if hidden_index is not None:  # the states entering the top layers
            return [joined(head.hidden_states[hidden_index], tail.hidden_states[hidden_index], i)
                    for i in range(len(continuations))]
        final = torch.cat([head.last_hidden_state.expand(len(continuations), -1, -1), tail.last_hidden_state], dim=1)
        last = gather_last(final, attention_mask.to(device)).float()  # (N, H); an empty continuation: the prefix's
        layers = (-1,) if self.pool_layers is None else self.pool_layers
        return [self._head_row(torch.cat([joined(head.hidden_states[layer], tail.hidden_states[layer], i).float()
                                          for layer in layers], dim=-1), last[i])
                for i in range(len(continuations))]

    @staticmethod
    def _head_row(tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """One cached row for the head alone: the token states, then the last token's final
        state as one more row, zero-padded to their width when several layers are pooled (read
        back by ``head_row_parts``). Shape: (n, D), (H,) -> (n + 1, D)."""
        return torch.cat([tokens, torch.nn.functional.pad(last, (0, tokens.shape[-1] - last.shape[-1]))[None]])

    def head_row_parts(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``_head_row``'s token states and last final state. Shape: (n + 1, D) -> (n, D), (H,)."""
        return row[:-1], row[-1, :self.hidden_size]

    def scores_from_trunk(self, rows: Sequence[torch.Tensor], response_lengths: Sequence[int], top_layers: int,
                          members: bool = False) -> torch.Tensor:
        """``forward``'s scores from ``trunk_rows``: the top layers, the final norm and the head
        (the head alone when ``top_layers`` is 0). Each row's last ``response_lengths[i]``
        tokens are its response. Shape: -> (N,) float32; ``members``: each ensemble member's, (M, N)."""
        device = next(self.parameters()).device
        head = self.head.member_scores if members and isinstance(self.head, HeadEnsemble) else self.head
        if top_layers == 0:
            parts = [self.head_row_parts(r) for r in rows]
            tokens, _, response_mask = pad_states([states for states, _ in parts], response_lengths)
            last = torch.stack([last for _, last in parts])
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
        prompt_ids = [render_chat_ids(tokenizer, p) for p in prompts]
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


def cut_backbone(backbone: torch.nn.Module, depth: int) -> torch.nn.Module:
    """Keep a Llama-style backbone's first ``depth`` decoder layers and make its final norm the
    identity, so that its output and ``hidden_states[depth]`` are layer ``depth``'s own
    states, as in the whole model. Returns the norm taken out."""
    layers, norm = getattr(backbone, "layers", None), getattr(backbone, "norm", None)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None or not 0 <= depth <= len(layers):
        raise ValueError(f"cannot cut {type(backbone).__name__} at layer {depth}: a pooled head without the final "
                         "state needs a Llama-style backbone (layers, norm) at least that deep")
    backbone.layers = torch.nn.ModuleList(list(layers)[:depth])
    backbone.norm = torch.nn.Identity()
    backbone.config.num_hidden_layers = depth
    return norm


def pooled_width(hidden_size: int, pool_layers: Sequence[int] | None) -> int:
    """How wide a token's pooled states are: one hidden state per pooled layer (the final one when None)."""
    return hidden_size * (len(pool_layers) if pool_layers else 1)


def head_features(head: torch.nn.Module) -> int | None:
    """The pooled head's projection count (None for the last-token head)."""
    member = head.members[0] if isinstance(head, HeadEnsemble) else head
    return member.proj.out_features if hasattr(member, "proj") else None
