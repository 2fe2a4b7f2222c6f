"""Where rlhf-loop keeps its files. Everything lives under one data directory,
`$RLHF_DATA_DIR` (default: `data/` in the repository), which git ignores."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory: a directory's fsync makes the names created or renamed
    in it durable (the last step of every write-aside-then-rename here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_dir() -> Path:
    """The root of all generated files (models, store, checkpoints, runs)."""
    return Path(os.environ.get("RLHF_DATA_DIR", REPO_ROOT / "data")).resolve()


def models_dir() -> Path:
    return data_dir() / "models"


def embedded_model_dir() -> Path:
    """The converted safetensors folder of the embedded model (made by `make model`)."""
    return models_dir() / EMBEDDED_MODEL_NAME
