"""Where and how a training stage runs: device choice (dtypes: `common.models.resolve_dtype`), seeding, CPU threads.

The defaults come from ``common.models`` (CUDA when available, bf16 where supported,
fp32 on CPU: CPU bf16 matmuls are slow on these machines). Everything here is called
once at a stage's entry point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator

import torch

from common.models import default_device

log = logging.getLogger(__name__)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' | None -> CUDA when available else CPU; 'cpu' | 'cuda' | torch.device as given."""
    if name is None or name == "auto":
        return default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


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


# ---------------------------------------------------------------------------- sharing the CPU


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: idle, iowait and steal are not work here
    busy = sum(fields[:8]) - fields[3] - fields[4] - (fields[7] if len(fields) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


class Neighbours:
    """How many cores OTHER processes kept busy over the last ``window_s`` seconds: all cores'
    busy time (/proc/stat) minus this process's CPU time, sampled by a daemon thread."""

    def __init__(self, window_s: float = 6.0, period_s: float = 1.0) -> None:
        self.window_s, self.period_s = window_s, period_s
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=int(window_s / period_s) + 2)
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="cpu-neighbours", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        busy = _busy_cpu_seconds()
        if busy is not None:
            self.samples.append((time.monotonic(), busy, time.process_time()))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def busy_cores(self) -> float | None:
        """Cores used by other processes over the window; None until two samples exist."""
        if len(self.samples) < 2:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.samples[0], self.samples[-1]
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0)) if t1 > t0 else None

    def stop(self) -> None:
        self._stop.set()


class ThreadsBesideNeighbours:
    """``torch.set_num_threads`` = the cores other processes leave idle (at least 1, at most
    ``max_threads``), re-decided at ``adapt_threads`` calls.

    Why: on a small machine the trainer runs beside the serving engine. Measured in the demo
    (2 cores, vLLM on one thread while labelers sample): torch on 2 threads then spends its
    time waiting at OpenMP barriers for the thread that shares a core with the engine; the
    gate's judge trained its 3 epochs in 35 s instead of 10 s uncontended, and SFT on one
    thread took 85 s where two threads took 129 s (docs/DEMO.md)."""

    def __init__(self, max_threads: int | None = None, neighbours: Neighbours | None = None) -> None:
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.max_threads = max_threads or self.cores
        self.neighbours = neighbours or Neighbours()
        self.decisions: list[tuple[float, int]] = []  # (time, threads) at every change

    def threads_now(self) -> int:
        others = self.neighbours.busy_cores()
        spare = self.cores - (others or 0.0)
        return max(1, min(self.max_threads, int(spare + 0.5)))

    def apply(self) -> int:
        threads = self.threads_now()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.decisions.append((time.time(), threads))
            log.info("torch threads -> %d (other processes used %.2f of %d cores lately)", threads,
                     self.neighbours.busy_cores() or 0.0, self.cores)
        return threads


_threads_policy: ThreadsBesideNeighbours | None = None


def share_cpu_with_neighbours(max_threads: int | None = None) -> ThreadsBesideNeighbours:
    """Turn on ``adapt_threads`` for this process (the trainer service does, by config)."""
    global _threads_policy
    _threads_policy = ThreadsBesideNeighbours(max_threads)
    return _threads_policy


def stop_sharing_cpu() -> None:
    global _threads_policy
    if _threads_policy is not None:
        _threads_policy.neighbours.stop()
    _threads_policy = None


def adapt_threads(fixed: int | None = None) -> int:
    """Called between units of work (stages, epochs, PPO iterations): with CPU sharing on and
    no ``fixed`` thread count for the stage, set torch's threads to the cores others leave
    idle. Returns the threads in use."""
    if _threads_policy is not None and fixed is None:
        return _threads_policy.apply()
    return torch.get_num_threads()
