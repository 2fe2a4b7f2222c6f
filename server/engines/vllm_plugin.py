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
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "RLHF_VLLM_QUIET_WAIT"
RECHECK_MS = 20  # a missed wake-up costs at most this; 50 wake-ups/s cost nothing measurable


def register() -> None:
    if os.environ.get(ENV) != "1":
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:  # another vLLM layout: leave it as it is
        return
    condition = getattr(shm_broadcast, "SpinCondition", None)
    if condition is None or getattr(condition, "_rlhf_quiet", False):
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
