"""LoRA adapters, set up one way for every stage that trains them (the RM, PPO's policy and value model)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from trainer.config import LORA_TARGETS


def _peft() -> ModuleType:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise ImportError("LoRA training needs peft: pip install 'peft>=0.21,<0.22'") from exc
    return peft


def lora_target_names(module: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """The names in ``targets`` that name linear layers of ``module``, sorted: where ``add_lora``
    puts adapters. Raises ValueError when none is found."""
    present = sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules()
                      if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets})
    if not present:
        raise ValueError(f"Unknown architecture: no linear layer named {list(targets)} to put LoRA adapters on")
    return present


def add_lora(module: torch.nn.Module, *, r: int, alpha: int, dropout: float = 0.0,
             targets: Sequence[str] = LORA_TARGETS, task_type: str | None = None) -> torch.nn.Module:
    """``module`` wrapped with LoRA adapters on its linear layers named in ``targets`` (the
    base weights frozen, the adapters trainable). Raises ValueError when none is found."""
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=lora_target_names(module, targets), task_type=task_type)
    return peft.get_peft_model(module, config)


def load_lora(module: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``module`` wrapped with the adapters PEFT's ``save_pretrained`` wrote to ``adapter_dir``,
    trainable: training continues from them instead of from fresh ones."""
    return _peft().PeftModel.from_pretrained(module, adapter_dir, is_trainable=True)


def saved_lora_mismatch(adapter_dir: Path, module: torch.nn.Module, *, r: int, alpha: int,
                        targets: Sequence[str]) -> str | None:
    """How the adapters saved in ``adapter_dir`` differ from those ``add_lora`` would put on
    ``module`` (None: they match): continuing them would otherwise train another shape of
    adapters than the config asks for."""
    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    saved_targets = saved.get("target_modules")
    have = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
            "target_modules": sorted(saved_targets) if isinstance(saved_targets, list) else saved_targets}
    wanted = {"r": r, "lora_alpha": alpha, "target_modules": lora_target_names(module, targets)}
    differences = [f"{key} {have[key]} != {wanted[key]}" for key in wanted if have[key] != wanted[key]]
    return "; ".join(differences) or None
