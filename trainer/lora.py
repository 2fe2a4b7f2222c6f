"""LoRA adapters, set up one way for every stage that trains them (the RM, PPO's policy and value model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.config import LORA_TARGETS


def add_lora(module: torch.nn.Module, *, r: int, alpha: int, dropout: float = 0.0,
             targets: Sequence[str] = LORA_TARGETS, task_type: str | None = None) -> torch.nn.Module:
    """``module`` wrapped with LoRA adapters on its linear layers named in ``targets`` (the
    base weights frozen, the adapters trainable). Raises ValueError when none is found."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise ImportError("LoRA training needs peft: pip install 'peft>=0.21,<0.22'") from exc
    present = sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules()
                      if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets})
    if not present:
        raise ValueError(f"Unknown architecture: no linear layer named {list(targets)} to put LoRA adapters on")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=present, task_type=task_type)
    return get_peft_model(module, config)
