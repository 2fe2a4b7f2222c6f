"""Modules that must import without torch: the trainer's configuration (read by the CLI, the
server's Admin checks and the demo before any stage trains) and the gate's decision.

Each runs in a fresh interpreter, since this test process has long imported torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = ["trainer.config", "trainer.loop_config", "trainer.gate"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    probe = (f"import sys, {module}; "
             "heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules); "
             "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"
