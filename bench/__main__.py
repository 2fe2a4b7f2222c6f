"""`make bench`: run every benchmark in one process and write docs/BENCHMARKS.md.

Each benchmark module exposes `run() -> dict` whose result carries a markdown section
under the key "markdown". Ratios are measured against a baseline in the same run; the
machine is described in the header so figures are read in context.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone

from common.paths import REPO_ROOT

# (module, title). Order matters a little: cheap ones first.
BENCHMARKS = [
    ("bench.store_writes", "Store: committed writes per second"),
    ("bench.store_backup", "Store: the server's write latency during an online backup"),
    ("bench.feedback", "Feedback: rankings per second over gRPC vs a bare echo service"),
    ("bench.webapp", "Labeling web app: the page's own latency beyond the lease"),
    ("bench.reward_model", "Reward model: K-way batched step vs naive pairwise"),
    ("bench.serving", "Serving: gRPC server vs offline vLLM and sequential HF; TTFT; swap stall"),
    ("bench.swap", "Hot swap per mode (drain, keep, keep reusing the KV cache, a bounded drain, adapter) under 16 streams"),
    ("bench.engine_memory", "vLLM engine memory: the same workload again and again"),
    ("bench.rate_limits", "Per-key limits: other keys' latency while one key floods"),
    ("bench.quiet_wait", "vLLM beside a busy neighbour: spinning vs quiet message-queue waits"),
    ("bench.distributed", "Data-parallel training steps: ranks x threads on this machine's cores"),
    ("bench.rollouts", "PPO rollouts in the trainer: HF generate vs a weight-synced vLLM engine"),
    ("bench.reward_curve", "Reward model learning curve: accuracy on unseen rankings vs training comparisons"),
    ("bench.ppo_effect", "PPO's effect in one cycle by the noise-free rule: the demo's recipe and its variants"),
    ("bench.best_of_n", "What the reward model is worth at best: best-of-n by the RM, judged by the noise-free rule"),
    ("bench.verdict_power", "The demo's verdict as a test: false-positive rate and power"),
]


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB RAM, GPU: {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="module names to run (default: all)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    sections, failed = [], []
    for module_name, title in BENCHMARKS:
        if args.only and module_name not in args.only and module_name.split(".")[-1] not in args.only:
            continue
        print(f"== {title} ({module_name})", flush=True)
        start = time.perf_counter()
        try:
            result = importlib.import_module(module_name).run()
            body = result.get("markdown", "")
        except Exception:  # one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(module_name)
            body = f"FAILED: see the output of `make bench`:\n\n```\n{traceback.format_exc(limit=3)}```\n"
        took = time.perf_counter() - start
        sections.append(f"## {title}\n\n`python -m bench --only {module_name.split('.')[-1]}` ({took:.0f} s)\n\n{body}\n")
    header = (
        "# Benchmarks\n\n"
        f"Written by `make bench` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n"
        f"Machine: {machine_description()}.\n\n"
        "Ratios compare against a baseline measured in the same run on the same machine.\n\n"
    )
    if not args.only:
        with open(args.out, "w") as f:
            f.write(header + "\n".join(sections))
        print(f"wrote {args.out}")
    else:
        print(header + "\n".join(sections))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
