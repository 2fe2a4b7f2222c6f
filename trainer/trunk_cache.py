"""The reward model's frozen trunk, computed once per token sequence and kept across cycles.

In ``top_layers`` mode (``RMConfig.train_mode``) everything below the top layers of the RM
is the lineage's SFT model, frozen. Every cycle retrains the RM on ALL rankings (the
paper's step 2), trains the gate's judge from the same SFT model, scores the validation
and held-out rankings, and scores the demonstrations to normalise the bias: without a
cache each of those ran the same completions through the same frozen layers again, so
the RM stage grew with the whole history (docs/DEMO.md: 166, 289, 248 s in the 08:28 demo
run, of which the epochs were 34 to 44 s). With it, a cycle's trunk work is its NEW
completions only.

``TrunkCache`` maps an exact token row (prompt + completion after truncation, as
``trainer.data.pack_row`` builds it) to what the model's ``trunk_rows`` gives for it: the
hidden states entering the top layers, (length, H), or, when only the head trains, the
head's token states and the final state at the last token, (length + 1, H). Rows are
right-padded and attention is causal, so a row's states do not depend on what else was in
its batch (up to float rounding between batch shapes, ~1e-6).
The cache is bound to one frozen trunk, ``TrunkKey``: the content hash of the model's
weight files, the number of top layers, dtype and device. A different key (a new SFT
model) empties it. It is bounded by size, least recently used rows evicted first.

The trainer process owns one (``trainer.service.TrainerService``) and hands it to each
cycle; ``train_reward_model`` works without one (each row is then computed once per
training, duplicates included only once).

Besides the cache, this module holds what binds it to one training: whether the trunk can
be cached at all (``can_cache_trunk``), the cache bound to the RM's frozen trunk
(``bind_trunk`` -> ``FrozenTrunk``), the training items' states (``attach_trunk_states``),
scoring from it (``scoring_from_trunk``), and the batch the top layers read (``pad_states``,
``only_top_layers``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.data import pack_row
from trainer.torch_parts import eval_mode, right_pad

if TYPE_CHECKING:
    from trainer.config import RMConfig
    from trainer.reward_model import RewardModel
    from trainer.rm_training import EncodedComparison

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class TrunkKey:
    """Which frozen trunk produced the states: equal keys, interchangeable states."""

    weights: str  # sha256 of the model folder's config and weight files
    top_layers: int
    dtype: str
    device: str
    # The head alone (top_layers 0): which hidden states its rows hold (``RewardModel.pool_layers``)
    pool_layers: tuple[int, ...] | None = None
    # Where the RM's backbone is cut (``reward_model.cut_backbone``; None: whole): its rows end
    # with that layer's last state instead of the final one
    cut_at: int | None = None


_fingerprints: dict[tuple, str] = {}  # (path, (name, size, mtime_ns)...) -> sha256: hash each folder once


def model_fingerprint(folder: Path | str) -> str:
    """sha256 over a model folder's config.json and weight files (name and bytes).
    Memoised on the files' names, sizes and modification times."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"{folder}: no weight files to fingerprint")
    stamp = (str(folder), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _fingerprints:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        _fingerprints[stamp] = digest.hexdigest()
    return _fingerprints[stamp]


def trunk_key(model_dir: Path | str, top_layers: int, model: torch.nn.Module) -> TrunkKey:
    parameter = next(model.parameters())
    pool_layers = getattr(model, "pool_layers", None) if top_layers == 0 else None
    return TrunkKey(model_fingerprint(model_dir), top_layers, str(parameter.dtype), str(parameter.device),
                    pool_layers, getattr(model, "cut_at", None))


class TrunkCache:
    """Trunk states per token row for ONE frozen trunk (``TrunkKey``), LRU-bounded by bytes."""

    def __init__(self, max_mb: float = 1024) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.key: TrunkKey | None = None
        self._rows: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.reused = 0  # rows answered from the cache, since creation
        self.computed = 0  # rows run through the trunk, since creation

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self.bytes = 0

    def states(self, rm: Any, key: TrunkKey | None, rows: Sequence[Sequence[int]], top_layers: int,
               pad_token_id: int, batch_size: int, prefix_lengths: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``rm.trunk_rows`` of each row: the states entering its top ``top_layers`` decoder layers
        (len(row), H), or with 0 the head's inputs (len(row) + 1, H).

        Rows not cached go through the trunk in batches of ``batch_size``: with
        ``prefix_lengths`` (each row's prompt length), grouped by prompt, the prompt run once
        per group (``_compute_by_prefix``); else right-padded, sorted by length. ``key`` None:
        nothing is kept beyond this call (a row repeated within it is still computed once).
        """
        if key is not None and key.top_layers != top_layers:
            raise ValueError(f"the cache key is for {key.top_layers} top layers, not {top_layers}")
        keep = key is not None
        if keep and key != self.key:
            self.clear()
            self.key = key
        keys = [tuple(row) for row in rows]
        found: dict[tuple[int, ...], torch.Tensor] = {}
        for row in keys:
            if row not in found and (states := self._get(row) if keep else None) is not None:
                found[row] = states
        self.reused += sum(1 for row in keys if row in found)
        missing = sorted({row for row in keys if row not in found}, key=len)
        with eval_mode(rm):
            if prefix_lengths is not None:
                computed = self._compute_by_prefix(rm, missing, dict(zip(keys, prefix_lengths)), top_layers, batch_size)
            else:
                computed = self._compute_padded(rm, missing, top_layers, pad_token_id, batch_size)
        for row, states in computed.items():
            found[row] = states
            if keep:
                self._put(row, states)
        self.computed += len(missing)
        return [found[row] for row in keys]

    @staticmethod
    def _compute_padded(rm: Any, rows: list[tuple[int, ...]], top_layers: int, pad_token_id: int, batch_size: int
                        ) -> dict[tuple[int, ...], torch.Tensor]:
        """Rows (sorted by length) through the trunk in right-padded batches of ``batch_size``."""
        device = next(rm.parameters()).device
        out = {}
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            input_ids, attention_mask = right_pad([torch.tensor(row, dtype=torch.long) for row in part], pad_token_id)
            states = rm.trunk_rows(input_ids.to(device), attention_mask.to(device), top_layers)
            for i, row in enumerate(part):
                out[row] = states[i].clone()  # its own storage, not a view of the batch
        return out

    @staticmethod
    def _compute_by_prefix(rm: Any, rows: list[tuple[int, ...]], prefix_lengths: dict[tuple[int, ...], int],
                           top_layers: int, batch_size: int) -> dict[tuple[int, ...], torch.Tensor]:
        """Rows grouped by their prompt (the first ``prefix_lengths[row]`` tokens): each prompt
        runs through the trunk once for its rows (``rm.trunk_rows_after_prefix``), up to
        ``batch_size`` of them at a time. K completions of a prompt then cost their own tokens."""
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for row in rows:
            groups.setdefault(row[:prefix_lengths[row]], []).append(row)
        out = {}
        for prefix, members in groups.items():
            for start in range(0, len(members), batch_size):
                part = members[start:start + batch_size]
                states = rm.trunk_rows_after_prefix(prefix, [row[len(prefix):] for row in part], top_layers)
                for row, row_states in zip(part, states):
                    out[row] = row_states.clone()
        return out

    def _get(self, row: tuple[int, ...]) -> torch.Tensor | None:
        states = self._rows.get(row)
        if states is not None:
            self._rows.move_to_end(row)
        return states

    def _put(self, row: tuple[int, ...], states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if size > self.max_bytes:
            return
        self._rows[row] = states
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


# ---------------------------------------------------------------------------- binding to one training


@dataclass
class FrozenTrunk:
    """A trunk cache bound to one RM whose lower layers are frozen (its ``TrunkKey``, or None:
    kept for this training only)."""

    cache: TrunkCache
    key: TrunkKey | None
    top_layers: int
    # The cache's counters when bound (a shared cache counts every training's rows).
    reused_before: int = field(init=False)
    computed_before: int = field(init=False)

    def __post_init__(self) -> None:
        self.reused_before, self.computed_before = self.cache.reused, self.cache.computed

    @property
    def rows_reused(self) -> int:
        """Rows answered from the cache (computed by an earlier training) since binding."""
        return self.cache.reused - self.reused_before

    @property
    def rows_computed(self) -> int:
        """Rows run through the trunk since binding."""
        return self.cache.computed - self.computed_before

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
            and rm.pool_layers is None and isinstance(getattr(rm.backbone, "layers", None), torch.nn.ModuleList))


def frozen_top_layers(config: RMConfig) -> int:
    """How many top decoder layers train above a cached trunk (0: the head alone)."""
    return 0 if config.train_mode == "head" else config.top_layers


def bind_trunk(rm: RewardModel, model_dir: Path | str | None, config: RMConfig, trunk_cache: TrunkCache | None
               ) -> FrozenTrunk | None:
    """The cache the frozen trunk's states come from: the shared one when the trunk is the
    model folder ``model_dir`` (its content hash is the key), else (``model_dir`` None: an RM
    trained in place) one for this training; None when ``can_cache_trunk`` says no."""
    if not can_cache_trunk(rm, config):
        return None
    top = frozen_top_layers(config)
    shared = trunk_cache is not None and model_dir is not None
    key = trunk_key(model_dir, top, rm) if shared else None
    return FrozenTrunk(trunk_cache if shared else TrunkCache(), key, top)


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


@contextlib.contextmanager
def scoring_from_trunk(rm: RewardModel, trunk: FrozenTrunk) -> Iterator[RewardModel]:
    """``rm.score_texts`` reads ``trunk`` inside the block (its lower layers must be the
    frozen ones the states came from)."""
    rm.frozen_trunk = trunk
    try:
        yield rm
    finally:
        rm.frozen_trunk = None


# ---------------------------------------------------------------------------- what the top layers read


def pad_states(states: Sequence[torch.Tensor], response_lengths: Sequence[int], width: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad per-row states, (len_i, H) each, to one batch with its masks; a row's last
    ``response_lengths[i]`` positions are its response. Returns states (B, W, H),
    attention_mask (B, W) long, response_mask (B, W) float."""
    padded, attention_mask = right_pad(states, 0, width)
    response_mask = torch.zeros(attention_mask.shape)
    for i, (s, n) in enumerate(zip(states, response_lengths)):
        response_mask[i, s.shape[0] - n:s.shape[0]] = 1
    return padded, attention_mask, response_mask


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
