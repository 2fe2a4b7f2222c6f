"""Torch building blocks every training stage shares (SFT, the reward model, its trunk cache, PPO).

- model anatomy: ``decoder_layers`` (the decoder block list of a causal LM or its base model),
  ``train_only_top_layers`` (what the RM's and PPO's ``top_layers`` modes train), ``model_device``;
- modes: ``eval_mode`` (dropout off, no autograd, previous mode restored) and
  ``training_dropout`` (residual and attention dropout while training only);
- batch shapes: ``right_pad`` (rows of token ids or states of different lengths -> one batch);
- optimisation: ``build_optimizer`` (AdamW with decay on matrices only) and its schedule,
  ``cosine_lr_lambda`` (linear warmup, cosine decay to a floor).

Residual dropout: HF Llama has no residual-dropout field, so ``training_dropout`` adds
forward hooks on every decoder layer's attention and MLP blocks that drop their OUTPUT
before it is added to the residual stream (where GPT-2's ``resid_pdrop`` acts). Hooks and
the optional attention dropout exist only inside the block: a saved model has neither.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- model anatomy


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder blocks of a causal LM or of its base model (Llama: ``model.layers``)."""
    for owner in (model, getattr(model, "model", None), getattr(model, "transformer", None)):
        for name in ("layers", "h"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList):
                return layers
    raise ValueError(f"Unknown architecture: no decoder layer list in {type(model).__name__}")


def train_only_top_layers(model: torch.nn.Module, n: int) -> None:
    """Freeze every weight of ``model`` (a causal LM or its base model) but its top ``n``
    decoder layers and the final norm above them. Embeddings (and an output layer tied to
    them) stay frozen, so no gradient flows below the lowest trained layer: the backward
    pass costs about n / depth of the whole one."""
    layers = decoder_layers(model)
    if not 0 <= n <= len(layers):
        raise ValueError(f"top_layers={n} but the model has {len(layers)} decoder layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - n:]:
        layer.requires_grad_(True)
    for owner in (model, getattr(model, "model", None)):
        norm = getattr(owner, "norm", None) if owner is not None else None
        if isinstance(norm, torch.nn.Module):
            norm.requires_grad_(True)
            break


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------- modes


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off and no autograd inside the block; the previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _drop_block_output(p: float) -> Callable:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not module.training or p == 0:
            return output
        if isinstance(output, tuple):  # attention returns (hidden, weights)
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    return hook


@contextlib.contextmanager
def training_dropout(model: torch.nn.Module, residual: float, attention: float = 0.0) -> Iterator[None]:
    """Residual dropout (hooks on each block's attention and MLP outputs) and attention dropout,
    active inside the block only (and only in train mode); everything is undone on exit."""
    handles = []
    for layer in decoder_layers(model) if residual > 0 else ():
        for block_name in ("self_attn", "mlp"):
            block = getattr(layer, block_name, None)
            if block is None:
                raise ValueError(f"Unknown architecture: decoder layer has no {block_name}")
            handles.append(block.register_forward_hook(_drop_block_output(residual)))
    saved = [(m, m.attention_dropout) for m in model.modules() if hasattr(m, "attention_dropout")]
    for module, _ in saved:
        module.attention_dropout = attention
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, value in saved:
            module.attention_dropout = value


# ---------------------------------------------------------------------------- batch shapes


def right_pad(rows: Sequence[torch.Tensor], value: float | int = 0, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows of different lengths, (len_i, ...) each (token ids or states), with
    ``value`` to ``width`` (default: the longest). Returns padded (B, W, ...) and
    attention_mask (B, W) long, 1 on each row's own positions."""
    width = width if width is not None else max(r.shape[0] for r in rows)
    padded = torch.stack([F.pad(r, (0, 0) * (r.dim() - 1) + (0, width - r.shape[0]), value=value)
                          for r in rows])
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        attention_mask[i, :r.shape[0]] = 1
    return padded, attention_mask


# ---------------------------------------------------------------------------- optimisation


def cosine_lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup 0 -> 1, then cosine decay 1 -> ``min_lr_ratio`` at ``total_steps``.

    Not ``transformers.get_cosine_with_min_lr_schedule_with_warmup``: after warmup the two
    agree on every step of training, but its warmup is ``step / warmup`` (the first step
    trains at LR 0; here ``(step + 1) / (warmup + 1)``, e.g. 1/3 vs 0 at warmup 2, and up to
    0.5 apart at warmup 1), and past ``total_steps`` its cosine rises again where this one
    stays at the floor. Its ``..._lr_rate`` variant shifts the whole decay by one step.
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        # lr = min + (1 - min) * 0.5 * (1 + cos(pi * progress))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_optimizer(
    params: Sequence[tuple[str, torch.nn.Parameter]],
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    total_steps: int,
    warmup_ratio: float,
    min_lr_ratio: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on matrices only, not on norms and biases) with warmup + cosine decay."""
    trainable = [(n, p) for n, p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters")
    groups = [
        {"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel for all tensors (several times faster than the per-tensor loop on CPU).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in trainable)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas,
                                  fused=fused or None)
    warmup = int(warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lr_lambda(warmup, total_steps, min_lr_ratio))
    return optimizer, schedule
