"""What the PII scan at ingest costs per prompt and per completion (one core, no store).

Prompts: the shipped set (~300 short prompts, 2% with PII), as plain prompts and as
4-turn chats (system + user + assistant + user); completions: ~128-token texts (ten
shipped prompts joined, ~470 characters), 1 in 10 with a phone number appended.

    .venv/bin/python scripts/pii_timing.py
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence

from clients.prompts import load_prompts
from common.store import NewCompletion
from server.pii_ingest import PiiIngest


def per_item_us(fn: Callable[[object], object], items: Sequence[object], repeats: int = 5) -> tuple[float, float]:
    """(mean, p99) microseconds of fn(item) over `repeats` passes of `items`."""
    times = []
    for _ in range(repeats):
        for item in items:
            start = time.perf_counter()
            fn(item)
            times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    return statistics.fmean(times), times[int(0.99 * (len(times) - 1))]


def main() -> None:
    rng = random.Random(0)
    texts = [p.text for p in load_prompts()]
    chats = [[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": rng.choice(texts)},
              {"role": "assistant", "content": " ".join(rng.sample(texts, 3))},
              {"role": "user", "content": t}] for t in texts]  # fmt: skip
    completions = [
        NewCompletion(idx=0, text=" ".join(rng.sample(texts, 10)) + (" Call 212-555-0142." if i % 10 == 0 else ""),
                      policy_version=0, finish_reason="stop", prompt_tokens=10, completion_tokens=128, latency_s=0.1)
        for i in range(300)
    ]  # fmt: skip
    print(f"mean chars: prompt {statistics.fmean(map(len, texts)):.0f}, "
          f"chat {statistics.fmean(sum(len(m['content']) for m in c) for c in chats):.0f}, "
          f"completion {statistics.fmean(len(c.text) for c in completions):.0f}")
    for mode in ("flag", "redact"):
        pii = PiiIngest(mode)  # type: ignore[arg-type]
        rows = {
            "prompt (plain)": per_item_us(lambda t: pii.prompt(t, None), texts),
            "prompt (4-turn chat)": per_item_us(lambda c: pii.prompt(c[-1]["content"], c), chats),
            "completion (~128 tokens)": per_item_us(pii.completion, completions),
        }
        for what, (mean, p99) in rows.items():
            print(f"{mode:6s} {what:26s} mean {mean:7.1f} us   p99 {p99:7.1f} us")
    long_text = " ".join(texts) * 2  # ~28k characters (the prompt limit is 64k)
    mean, _ = per_item_us(lambda t: PiiIngest().prompt(t, None), [long_text], repeats=3)
    print(f"flag   prompt of {len(long_text)} chars     mean {mean / 1000:7.1f} ms")
    print(f"asyncio.to_thread round trip (the hand-off itself): mean {asyncio.run(_to_thread_us()):.1f} us")


async def _to_thread_us(n: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await asyncio.to_thread(int)
    return (time.perf_counter() - start) / n * 1e6


if __name__ == "__main__":
    main()
