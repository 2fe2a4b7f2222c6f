"""Committed writes per second through the store.

Each write is what the server does per generation: one prompt and one completion inserted
in one op, and the submitter waits until the transaction holding it has committed. The
submitters are 1 or 8 threads calling `write_sync`, or asyncio tasks awaiting `write`,
each on a fresh temp file for `SECONDS_PER_CASE`. The baseline is one thread with
synchronous=FULL: one fsync per write. "no group commit" runs the same 8 threads with
`max_batch=1` (one transaction per write) to show what batching buys.

    python -m bench.store_writes
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.store import NewCompletion, Store, Synchronous, add_completions, add_prompt

SECONDS_PER_CASE = 2.5
ASYNC_TASKS = 64


@dataclass(frozen=True)
class Case:
    synchronous: Synchronous
    submitters: str  # "threads" or "asyncio"
    count: int  # threads or tasks
    max_batch: int = 256

    @property
    def label(self) -> str:
        kind = "thread" if self.submitters == "threads" else "asyncio task"
        plural = "s" if self.count > 1 else ""
        if self.count == 1:
            return f"1 {kind}"  # one submitter never has company in a batch
        batching = "no group commit" if self.max_batch == 1 else "group commit"
        return f"{self.count} {kind}{plural}, {batching}"


CASES = [
    Case("FULL", "threads", 1),
    Case("FULL", "threads", 8, max_batch=1),
    Case("FULL", "threads", 8),
    Case("FULL", "asyncio", ASYNC_TASKS),
    Case("NORMAL", "threads", 1),
    Case("NORMAL", "threads", 8),
    Case("NORMAL", "asyncio", ASYNC_TASKS),
]


def generation_op(i: int) -> Any:
    """A small prompt and one completion, in one op (one savepoint of a batch)."""

    def op(db: Any) -> str:
        prompt = add_prompt(f"bench-user-{i % 100}", f"bench prompt {i}")(db)
        sample = NewCompletion(
            idx=0, text=f"bench completion {i}", policy_version=0, finish_reason="stop",
            prompt_tokens=12, completion_tokens=24, latency_s=0.1, sampling={"temperature": 1.0},
        )  # fmt: skip
        add_completions(prompt.id, [sample])(db)
        return prompt.id

    return op


def _threads(store: Store, count: int, deadline: float) -> list[float]:
    """`count` threads each writing until the deadline; returns every write's latency."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        mine, i = [], t * 10_000_000
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            store.write_sync(generation_op(i))
            mine.append(time.perf_counter() - start)
            i += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def _asyncio(store: Store, count: int, deadline: float) -> list[float]:
    """`count` asyncio tasks each awaiting writes until the deadline."""

    async def worker(t: int) -> list[float]:
        mine, i = [], t * 10_000_000
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await store.write(generation_op(i))
            mine.append(time.perf_counter() - start)
            i += 1
        return mine

    async def main() -> list[float]:
        per_task = await asyncio.gather(*(worker(t) for t in range(count)))
        return [x for task in per_task for x in task]

    return asyncio.run(main())


def run_case(case: Case, directory: Path, seconds: float = SECONDS_PER_CASE) -> dict[str, Any]:
    """Measure one case on a fresh file; check that every acknowledged write is there."""
    path = directory / f"{case.synchronous}-{case.submitters}-{case.count}-{case.max_batch}.db"
    with Store(path, synchronous=case.synchronous, max_batch=case.max_batch) as store:
        start = time.perf_counter()
        submit = _threads if case.submitters == "threads" else _asyncio
        latencies = submit(store, case.count, start + seconds)
        elapsed = time.perf_counter() - start
        writer = store.writer_stats()
        stored = store.read_sync(lambda db: db.table("completions").count)
    if stored != len(latencies):
        raise AssertionError(f"{case.label}: {len(latencies)} writes acknowledged, {stored} stored")
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "case": case.label, "synchronous": case.synchronous, "writes": len(latencies),
        "seconds": elapsed, "writes_per_s": len(latencies) / elapsed,
        "mean_batch": writer.ops_committed / max(writer.batches, 1),
        "p50_ms": quantiles[49] * 1e3, "p99_ms": quantiles[98] * 1e3,
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table, ratios against the first row (the baseline)."""
    base = rows[0]["writes_per_s"]
    lines = [
        "| synchronous | submitters | writes/s | × baseline | mean batch | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['synchronous']} | {r['case']} | {r['writes_per_s']:,.0f} | "
            f"{r['writes_per_s'] / base:.1f} | {r['mean_batch']:.1f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    note = (
        "\nEach write is one prompt + one completion, acknowledged after its commit. "
        "Baseline: the first row (one thread, one fsync per write). FULL fsyncs the WAL at "
        "every commit (survives power loss); NORMAL only at checkpoints (survives a process "
        "crash, may lose the last commits on power loss). The store runs FULL.\n"
    )
    return "\n".join(lines) + "\n" + note


def run(seconds: float = SECONDS_PER_CASE) -> dict[str, Any]:
    """Run every case; return {"rows": [...], "markdown": table}."""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        rows = [run_case(case, Path(tmp), seconds) for case in CASES]
    table = markdown(rows)
    print(table, flush=True)
    return {"rows": rows, "markdown": table}


if __name__ == "__main__":
    run()
