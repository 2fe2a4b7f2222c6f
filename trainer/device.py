"""Where and how a training stage runs: device and dtype choice, seeding, CPU threads.

The defaults come from ``common.models`` (CUDA when available, bf16 where supported,
fp32 on CPU: CPU bf16 matmuls are slow on these machines). Everything here is called
once at a stage's entry point.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator

import torch

from common.models import default_device, default_dtype


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' | None -> CUDA when available else CPU; 'cpu' | 'cuda' | torch.device as given."""
    if name is None or name == "auto":
        return default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' | None -> ``default_dtype(device)``; 'float32' | 'bfloat16' | 'float16' | torch.dtype as given."""
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype: {name!r}")
    return dtype


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's (all devices') global RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


def set_num_threads(num_threads: int | None) -> None:
    """``torch.set_num_threads`` when given; None leaves torch's choice alone."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block, then restore the previous setting."""
    previous = torch.get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def progress_enabled(wanted: bool) -> bool:
    """tqdm bars only when asked for and stderr is an interactive terminal."""
    return wanted and sys.stderr.isatty()
