"""The process environment a vLLM engine of ours starts under, set in ONE place.

vLLM reads these through ``vllm.envs`` when it needs them (most when an engine starts;
an engine's processes inherit them, and freeze them once started: ``enable_envs_cache``),
and our plugin (``server.engines.vllm_plugin``) reads its own in every vLLM process. Before
the first ``import vllm`` is the one moment that is early enough for every read, so that is
where ``set_vllm_env_defaults`` runs: the server's engine calls it first thing in
``VLLMEngine.__init__`` (``server.engines.vllm`` imports vllm only after it), and the
benchmarks that drive vLLM directly call it before they import vllm. Imports the standard
library only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# setdefault semantics: a value already in the environment (the caller's choice) wins.
VLLM_ENV_DEFAULTS: dict[str, str] = {
    # Read by vLLM's CPU platform when the engine starts. 1 GiB of KV cache is plenty for
    # small models and small concurrency.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Thread binding: "auto" (one OpenMP thread per physical core of a NUMA node: ONE thread
    # on this 2-vCPU machine), "nobind", or a CPU list like "0-1" ("all" is refused at
    # start-up). Measured here with other processes busy (load average 12-18, SmolLM2 fp32,
    # 16 x 64 tokens offline): "auto" 50-58 tok/s, "0,1" 8-11, "nobind" 6-8: two threads
    # spinning at OpenMP barriers collapse when the cores are oversubscribed, as they are
    # whenever the trainer runs beside the server. On an idle machine "0-1" is faster
    # (170 vs 143 tok/s, MACHINE-FACTS): set it explicitly there.
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    # server/engines/vllm_plugin.py: the engine's processes wait on vLLM's message queue
    # without spinning. Measured (docs/DEMO.md): beside a 1-thread torch loop on these 2
    # cores, sampling went from 79-81 to 95-96 tok/s and the torch loop from 164-175 to
    # 253-256 iterations/s.
    "RLHF_VLLM_QUIET_WAIT": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def set_vllm_env_defaults() -> None:
    """Put each of ``VLLM_ENV_DEFAULTS`` that is unset into ``os.environ`` (for good: the
    engine's processes and vLLM's later reads see them). Call before ``import vllm``."""
    for name, value in VLLM_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def vllm_environment(overrides: dict[str, str] | None = None) -> Iterator[None]:
    """``VLLM_ENV_DEFAULTS`` (where unset) and ``overrides`` in ``os.environ`` only while an
    engine starts (its processes inherit them then); the previous values come back after.
    For an engine inside a process that is not vLLM's own (the trainer's rollout engine)."""
    wanted = {k: v for k, v in VLLM_ENV_DEFAULTS.items() if k not in os.environ} | (overrides or {})
    previous = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
