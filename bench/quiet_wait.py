"""vLLM's message-queue wait beside a busy neighbour: spinning (vLLM's default) vs quiet
(server/engines/vllm_plugin.py, RLHF_VLLM_QUIET_WAIT=1, what the server uses).

Each run is a fresh child process: offline vLLM (fp32, eager, one OpenMP thread as the
server runs it) samples 24 chat prompts x 96 tokens again and again for ~36 s while a
second process, standing in for the trainer, multiplies matrices on one torch thread.
Both speeds are reported; the two settings alternate, `--rounds` times each. Only the
ratios within one run mean anything (the neighbour's speed depends on the machine).

    python -m bench.quiet_wait [--rounds 2] [--seconds 36]   # markdown on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common.paths import REPO_ROOT

# The neighbour: one torch thread doing dense work, as the trainer does beside the engine.
NEIGHBOUR = r"""
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
n, started = 0, time.time()
while time.time() - started < float(sys.argv[1]):
    a = torch.tanh(a @ a)
    n += 1
print(n / (time.time() - started))
"""


def child(seconds: float) -> dict:
    """One measurement in this process (its RLHF_VLLM_QUIET_WAIT is already set)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    from vllm import LLM, SamplingParams

    from clients.prompts import load_prompts
    from common.models import ensure_embedded_model

    chats = [[{"role": "user", "content": p.text}] for p in load_prompts()[64:88]]
    llm = LLM(model=str(ensure_embedded_model()), dtype="float32", enforce_eager=True, seed=0)
    llm.chat(chats[:2], SamplingParams(max_tokens=8))  # warm-up
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(seconds + 4)], stdout=subprocess.PIPE,
                                 text=True)
    tokens, started = 0, time.time()
    while time.time() - started < seconds:
        out = llm.chat(chats, SamplingParams(temperature=1.0, max_tokens=96))
        tokens += sum(len(o.outputs[0].token_ids) for o in out)
    elapsed = time.time() - started
    return {"quiet": os.environ.get("RLHF_VLLM_QUIET_WAIT") == "1", "tok_s": tokens / elapsed,
            "neighbour_it_s": float(neighbour.communicate()[0])}


def measure(quiet: bool, seconds: float) -> dict:
    env = {**os.environ, "RLHF_VLLM_QUIET_WAIT": "1" if quiet else "0"}
    done = subprocess.run([sys.executable, "-m", "bench.quiet_wait", "--child", "--seconds", str(seconds)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=True)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def run(rounds: int = 2, seconds: float = 36.0) -> dict:
    results = []
    for i in range(rounds):
        for quiet in ((False, True) if i % 2 == 0 else (True, False)):
            results.append(measure(quiet, seconds))
    spin = [r for r in results if not r["quiet"]]
    quiet = [r for r in results if r["quiet"]]

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    lines = ["| wait | vLLM sampling (tok/s) | neighbour (iterations/s) |", "| --- | --- | --- |"]
    lines += [f"| {'quiet' if r['quiet'] else 'spin'} | {r['tok_s']:.1f} | {r['neighbour_it_s']:.0f} |" for r in results]
    ratio_tok, ratio_neighbour = mean(quiet, "tok_s") / mean(spin, "tok_s"), \
        mean(quiet, "neighbour_it_s") / mean(spin, "neighbour_it_s")
    lines += ["", f"Quiet / spin: sampling {ratio_tok:.2f}x, neighbour {ratio_neighbour:.2f}x "
              f"(means of {rounds} runs each, alternating)."]
    return {"runs": results, "ratio_tok_s": ratio_tok, "ratio_neighbour": ratio_neighbour,
            "markdown": "\n".join(lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=36.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.seconds)), flush=True)
        return 0
    print(run(args.rounds, args.seconds)["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
