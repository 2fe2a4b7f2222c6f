"""Modules that must import without torch: the trainer's configuration, the gate's decision,
the training examples, and the trainer process itself (its service, cycle bookkeeping and
CLI), which imports torch only once a stage trains (the lazy imports in ``trainer.cycle``).

Each runs in a fresh interpreter, since this test process has long imported torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = ["trainer.config", "trainer.loop_config", "trainer.gate", "trainer.examples", "trainer.snapshot_data",
              "trainer.publishing", "trainer.cycle", "trainer.service", "trainer.cli", "trainer.maintenance",
              "trainer.store_cli"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    probe = (f"import sys, {module}; "
             "heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules); "
             "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"
