"""gRPC's fork support is off in every process of ours unless the environment says otherwise,
and off BEFORE grpc is first imported (gRPC reads the setting then): common/__init__.py says
why (a forked child aborting before exec, grpc/grpc#43055).

Each entry point runs in a fresh interpreter with the variable unset; an import hook records
its value at the moment ``grpc`` is first imported (for a module that imports grpc only
later, lazily, its value once the module is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VARIABLE = "GRPC_ENABLE_FORK_SUPPORT"

# The product's process entry points (``rlhf`` is common.cli), the simulated labelers the
# demo runs, and a benchmark that drives a server.
ENTRY_MODULES = ["common.cli", "server.app", "trainer.service", "webapp.app", "clients.simulated_labeler",
                 "clients.label_tui", "bench.soak"]

PROBE = """
import importlib.abc, os, runpy, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "<unset>"))
        return None
sys.meta_path.insert(0, Watch())
target = sys.argv[1]
if target.endswith(".py"):
    runpy.run_path(target, run_name="probe")  # a script: its top level, not its main()
else:
    __import__(target)
# A module that imports grpc lazily (common.cli, trainer.service): the value its later import will read.
print(seen[0] if seen else os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "<unset>"))
"""


def value_at_grpc_import(target: str, env_value: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    if env_value is not None:
        env[VARIABLE] = env_value
    result = subprocess.run([sys.executable, "-c", PROBE, target], capture_output=True, text=True, timeout=180,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_fork_support_is_off_before_grpc_is_imported(module):
    assert value_at_grpc_import(module) == "false"


def test_the_demo_script_sets_it_before_its_own_grpc_import():
    assert value_at_grpc_import(str(REPO / "scripts" / "demo.py")) == "false"


def test_an_explicit_choice_in_the_environment_wins():
    assert value_at_grpc_import("server.app", env_value="1") == "1"
