"""Fixtures shared by the whole suite.

- `tiny_model_dir`: the tiny random-init Llama (seed 0) cached in
  `<data_dir>/models/tiny-llama-seed0`; rebuilt only when missing or corrupt. Read it,
  never write into it: copy it (or write a checkpoint from it) to change anything.
- `embedded_model_dir`: the converted SmolLM2-135M-Instruct (mark such tests `slow`).
- `tmp_data_dir`: a fresh, empty RLHF_DATA_DIR for one test.
"""

from __future__ import annotations

import os

# Before anything imports transformers or huggingface_hub: they read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from common import paths  # noqa: E402  (importing `common` also turns gRPC's fork support off: common/__init__.py)

TINY_SEED = 0


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The converted embedded model folder (converted on first use, ~35 s; then ~0.5 s)."""
    from common.models import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny test Llama, cached across sessions; needs the embedded model on first build."""
    from common.models import build_tiny_model

    return build_tiny_model(paths.models_dir() / f"tiny-llama-seed{TINY_SEED}", seed=TINY_SEED)


@pytest.fixture
def tmp_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data dir, set as RLHF_DATA_DIR for this test only."""
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("RLHF_DATA_DIR", str(data))
    return data


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on 2 shared cores, one is ~10x faster than
    two under contention (the training-stage tests use it)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
