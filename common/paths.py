"""Where rlhf-loop keeps its files. Everything lives under one data directory,
`$RLHF_DATA_DIR` (default: `data/` in the repository), which git ignores."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def data_dir() -> Path:
    """The root of all generated files (models, store, checkpoints, runs)."""
    return Path(os.environ.get("RLHF_DATA_DIR", REPO_ROOT / "data")).resolve()


def models_dir() -> Path:
    return data_dir() / "models"


def embedded_model_dir() -> Path:
    """The converted safetensors folder of the embedded model (made by `make model`)."""
    return models_dir() / EMBEDDED_MODEL_NAME
