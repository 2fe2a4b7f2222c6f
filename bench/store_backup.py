"""How much an online backup slows the server's writes: `VACUUM INTO` (what
`common.store.backup` uses, through `Store.snapshot`) against the sqlite3 backup API, in one
step and in steps.

A store of `PROMPTS` prompts with 4 completions each (~`TEXT_CHARS` characters) is built
once; then, per case, one thread writes a prompt + completion per `write_sync` (what the
server does per generation; synchronous=FULL) while the backup runs, and the latency of
each acknowledged write during the backup is compared with the same writer alone.

    python -m bench.store_backup
"""

from __future__ import annotations

import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.store import NewCompletion, Store, add_completions, add_prompt, check_integrity

PROMPTS = 20_000
TEXT_CHARS = 400
IDLE_SECONDS = 3.0
STEP_PAGES = 256  # pages per step of the stepped backup API (1 MiB at 4 KiB pages)
STEP_DEADLINE_S = 60.0
ROUNDS = 2  # the cases run in turn, twice: the machine's other load changes over seconds


def sample(i: int, text: str) -> NewCompletion:
    return NewCompletion(idx=i, text=text, policy_version=0, finish_reason="stop", prompt_tokens=20,
                         completion_tokens=80, latency_s=0.5)


def build(path: Path) -> None:
    """The store to back up: PROMPTS prompts with 4 long completions each."""
    filler = ("lorem ipsum dolor sit amet " * 40)[:TEXT_CHARS]

    def chunk(start: int) -> Callable[..., None]:
        def op(db):
            for i in range(start, min(start + 1000, PROMPTS)):
                p = add_prompt(f"user-{i % 97}", f"prompt {i} {filler}")(db)
                add_completions(p.id, [sample(k, f"{k} {filler}") for k in range(4)])(db)
        return op

    with Store(path, synchronous="NORMAL") as store:
        for start in range(0, PROMPTS, 1000):
            store.write_sync(chunk(start))


def vacuum_into(check: bool) -> Callable[[Store, Path], dict[str, object]]:
    def run(store: Store, dest: Path) -> dict[str, object]:
        store.snapshot(dest, check=check_integrity if check else None)
        return {}
    return run


def backup_api(pages: int) -> Callable[[Store, Path], dict[str, object]]:
    def run(store: Store, dest: Path) -> dict[str, object]:
        restarts, last_remaining, started = 0, None, time.perf_counter()

        def progress(status: int, remaining: int, total: int) -> None:
            nonlocal restarts, last_remaining
            if last_remaining is not None and remaining > last_remaining:
                restarts += 1  # another connection wrote: SQLite started the copy over
            last_remaining = remaining
            if time.perf_counter() - started > STEP_DEADLINE_S:
                raise TimeoutError(f"no finished copy after {STEP_DEADLINE_S:.0f} s ({restarts} restarts)")

        src = sqlite3.connect(store.path)
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst, pages=pages, progress=progress if pages > 0 else None, sleep=0)
            return {"restarts": restarts, "finished": True}
        except Exception as exc:  # noqa: BLE001 - the stepped copy may never finish: report it
            return {"restarts": restarts, "finished": False, "error": str(exc)}
        finally:
            src.close()
            dst.close()
    return run


CASES: dict[str, Callable[[Store, Path], dict[str, object]] | None] = {
    "no backup": None,
    "VACUUM INTO (Store.snapshot)": vacuum_into(check=False),
    "VACUUM INTO + integrity_check (backup_store)": vacuum_into(check=True),
    "backup API, one step": backup_api(-1),
    f"backup API, steps of {STEP_PAGES} pages": backup_api(STEP_PAGES),
}


def measure(store: Store, tmp: Path, name: str, backup: Callable[[Store, Path], dict[str, object]] | None) -> dict:
    latencies: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            store.write_sync(add_prompt("bench", f"w {name} {i}"))
            latencies.append(time.perf_counter() - started)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)  # the writer runs before the backup starts
    latencies.clear()
    started = time.perf_counter()
    extra = {}
    if backup is None:
        time.sleep(IDLE_SECONDS)
    else:
        extra = backup(store, tmp / f"backup-{len(list(tmp.iterdir()))}.sqlite")
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    ms = sorted(x * 1000 for x in latencies)
    return {"case": name, "seconds": seconds, "writes": len(ms), "p50": statistics.median(ms),
            "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "max": ms[-1], **extra}


def run() -> dict[str, object]:
    """Build the store, measure every case ROUNDS times; `markdown` holds the table."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        path = tmp / "store.sqlite"
        build(path)
        size_mib = path.stat().st_size / 2**20
        (tmp / "out").mkdir()
        with Store(path) as store:
            measure(store, tmp / "out", "warm-up", None)  # the build's dirty pages flushed first
            rows = [measure(store, tmp / "out", name, case) for _ in range(ROUNDS) for name, case in CASES.items()]
    lines = [f"A store of {PROMPTS} prompts x 4 completions ({size_mib:.0f} MiB); one thread writes a prompt per "
             "`write_sync` (synchronous=FULL) during each backup; each case runs twice, in turn.", "",
             "| case | backup s | writes during | write p50 ms | p99 ms | max ms | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: list(CASES).index(r["case"])):
        note = ""
        if "restarts" in r:
            note = f"{r['restarts']} restarts" + ("" if r["finished"] else f", NOT finished: {r['error']}")
        lines.append(f"| {r['case']} | {r['seconds']:.2f} | {r['writes']} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['max']:.1f} | {note} |")
    return {"rows": rows, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    print(run()["markdown"])
