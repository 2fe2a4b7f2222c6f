"""Soak: the whole service under mixed traffic for a long while (30 minutes by default).

A real server (`python -m server.app`, vLLM where installed) and a real trainer
(`python -m trainer.service`, the demo's trainer config) on one store; users send
Generate calls without pause, labelers work the Feedback queue, and a cycle is triggered
every `cycle_every_min` minutes. It reports:

- failed requests that were not a limit (must be 0) and the limits' refusals, by status;
- the server's and the trainer's memory (RSS of each process tree, from /proc) after the
  warm-up and at the end: the growth, and its slope over the second half (a leak grows
  steadily; a cache fills and stops);
- acknowledged = stored: every completion a Generate reply acknowledged and every ranking
  a SubmitRanking acknowledged is in the store after the server stopped.

A benchmark, not a test: it runs for minutes and its figures depend on the machine.

    python -m bench.soak                 # 30 minutes
    python -m bench.soak --minutes 5     # a shorter look
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from clients.client import RlhfClient
from clients.prompts import load_prompts
from clients.simulated_labeler import SimulatedLabeler
from common import paths
from common.identity import generate_api_key, hash_api_key
from common.store import Store, add_api_key
from rlhf.v1 import admin_pb2, feedback_pb2_grpc

MINUTES = 30.0
WARM_UP_S = 120.0
SAMPLE_EVERY_S = 30.0
USERS = 4
LABELERS = (("soak-labeler-a", "A"), ("soak-labeler-b", "A"))
MAX_NEW_TOKENS = 32
CYCLE_EVERY_MIN = 10.0
LIMIT_CODES = {grpc.StatusCode.RESOURCE_EXHAUSTED}  # a limit saying "later", not a failure
TRAINER_TOML = paths.REPO_ROOT / "scripts" / "demo_trainer.toml"


# ---------------------------------------------------------------------------- processes


MEMORY_KINDS = ("RssAnon", "RssFile", "RssShmem")  # what a process's RSS is made of (Linux /proc)


def tree_memory_mb(pid: int) -> dict[str, dict[str, float]]:
    """Each process of a tree (a process and all its descendants): its RSS by kind, in MiB.

    Keyed "name:pid" (name from /proc/PID/comm). Anonymous memory that keeps growing is a
    leak's signature; file-backed pages (the mapped weights) and shared memory fill once.
    """
    found, stack = {}, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            name = Path(f"/proc/{p}/comm").read_text().strip()
            found[f"{name}:{p}"] = {kind: int(fields[kind].split()[0]) / 1024 for kind in MEMORY_KINDS}
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, KeyError, ValueError):
            continue
    return found


def tree_rss_mb(processes: dict[str, dict[str, float]]) -> float:
    return sum(sum(kinds.values()) for kinds in processes.values())


def start(name: str, args: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, *args], cwd=paths.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def stop(proc: subprocess.Popen, timeout: float = 90) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# ---------------------------------------------------------------------------- the people


@dataclass
class Tally:
    """What the clients saw; shared by the threads (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: Counter = field(default_factory=Counter)  # by kind: generate, ranking
    refused: Counter = field(default_factory=Counter)  # (kind, status) of limit refusals
    failed: Counter = field(default_factory=Counter)  # (kind, status) of anything else
    completion_ids: set[str] = field(default_factory=set)
    rankings_by_labeler: Counter = field(default_factory=Counter)

    def error(self, kind: str, err: grpc.RpcError) -> None:
        with self.lock:
            (self.refused if err.code() in LIMIT_CODES else self.failed)[(kind, err.code().name)] += 1


def user_loop(target: str, key: str, prompts: list[str], offset: int, stop_at: float, tally: Tally) -> None:
    with RlhfClient(target, key) as client:
        i = offset
        while time.time() < stop_at:
            try:
                reply = client.generate(prompts[i % len(prompts)], max_new_tokens=MAX_NEW_TOKENS, timeout=300)
                with tally.lock:
                    tally.ok["generate"] += 1
                    tally.completion_ids.update(c.completion_id for c in reply.completions)
            except grpc.RpcError as err:
                tally.error("generate", err)
                time.sleep(1.0)
            i += USERS


def labeler_loop(target: str, name: str, key: str, seed: int, stop_at: float, tally: Tally) -> None:
    labeler = SimulatedLabeler(seed=seed, metadata=(("authorization", f"Bearer {key}"),))
    with grpc.insecure_channel(target) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)
        while time.time() < stop_at:
            try:
                report = labeler.run(stub, 2, k=4, timeout=300)
            except grpc.RpcError as err:
                tally.error("label", err)
                time.sleep(2.0)
                continue
            with tally.lock:
                tally.ok["ranking"] += report.submitted
                tally.rankings_by_labeler[name] += report.submitted
                for status, n in report.refused.items():
                    tally.failed[("ranking", status)] += n
            if report.no_task:
                time.sleep(2.0)  # the queue is empty until users send more prompts


# ---------------------------------------------------------------------------- the run


def set_up(out: Path) -> dict[str, str]:
    keys = {"admin": generate_api_key()}
    with Store(out / "rlhf.sqlite") as store:
        store.write_sync(add_api_key("soak-operator", "admin", hash_api_key(keys["admin"])))
        for name, group in LABELERS:
            keys[name] = generate_api_key()
            store.write_sync(add_api_key(name, "labeler", hash_api_key(keys[name]), labeler_group=group))
        for i in range(USERS):
            keys[f"soak-user-{i}"] = generate_api_key()
            store.write_sync(add_api_key(f"soak-user-{i}", "user", hash_api_key(keys[f"soak-user-{i}"])))
    return keys


def stored(out: Path, tally: Tally) -> dict[str, Any]:
    """Acknowledged = stored, read after the server stopped."""
    with Store.open_readonly(out / "rlhf.sqlite") as store:
        def read(db: Any) -> tuple[set[str], Counter]:
            ids = {r[0] for r in db.execute("SELECT id FROM completions")}
            by_labeler = Counter({r[0]: r[1] for r in db.execute(
                "SELECT labeler_id, COUNT(*) FROM rankings GROUP BY labeler_id")})
            return ids, by_labeler
        ids, by_labeler = store.read_sync(read)
    missing = tally.completion_ids - ids
    short = {name: n - by_labeler.get(name, 0) for name, n in tally.rankings_by_labeler.items()
             if by_labeler.get(name, 0) < n}
    return {"acknowledged_completions": len(tally.completion_ids), "missing_completions": len(missing),
            "acknowledged_rankings": sum(tally.rankings_by_labeler.values()), "rankings_short": short}


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per hour."""
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mt, mr = sum(t for t, _ in samples) / n, sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 3600 * sum((t - mt) * (r - mr) for t, r in samples) / var if var else float("nan")


def run(minutes: float = MINUTES, engine: str = "auto", cycle_every_min: float = CYCLE_EVERY_MIN) -> dict[str, Any]:
    from common.models import ensure_embedded_model

    out = paths.data_dir() / "bench" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    model = ensure_embedded_model()
    keys = set_up(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    server = start("server", ["-m", "server.app", "--engine", engine, "--port", str(port),
                              "--store-path", str(out / "rlhf.sqlite"), "--checkpoints-root", str(out / "checkpoints"),
                              "--base-model-dir", str(model), "--base-model-name", model.name], out)
    trainer = None
    try:
        with RlhfClient(target, keys["admin"]) as client:
            client.wait_until_serving(600, alive=lambda: server.poll() is None)
        overrides = [f"store_path={out / 'rlhf.sqlite'}", f"checkpoints_root={out / 'checkpoints'}",
                     f"work_dir={out / 'trainer'}", f"server_address={target}", "schedule=off"]
        trainer = start("trainer", ["-m", "trainer.service", "--config", str(TRAINER_TOML),
                                    *[a for o in overrides for a in ("--set", o)]],
                        out, {"RLHF_ADMIN_KEY": keys["admin"]})
        figures = drive(target, keys, server, trainer, minutes, cycle_every_min)
    finally:
        if trainer is not None:
            stop(trainer)
        figures_exit = stop(server)
    figures["server_exit"] = figures_exit
    figures.update(stored(out, figures.pop("tally")))
    write_samples(out, figures.pop("per_process_samples"))
    figures["folder"] = str(out)
    figures["markdown"] = markdown(figures)
    return figures


def drive(target: str, keys: dict[str, str], server: subprocess.Popen, trainer: subprocess.Popen,
          minutes: float, cycle_every_min: float) -> dict[str, Any]:
    started = time.time()
    stop_at = started + 60 * minutes
    prompts = [p.text for p in load_prompts()]
    tally = Tally()
    threads = [threading.Thread(target=user_loop, args=(target, keys[f"soak-user-{i}"], prompts, i, stop_at, tally))
               for i in range(USERS)]
    threads += [threading.Thread(target=labeler_loop, args=(target, name, keys[name], seed, stop_at, tally))
                for seed, (name, _) in enumerate(LABELERS)]
    for t in threads:
        t.start()
    rss: dict[str, list[tuple[float, float]]] = {"server": [], "trainer": []}
    per_process: list[tuple[float, str, str, dict[str, float]]] = []  # (s, tree, process, kinds)
    cycles, next_cycle = [], started + 60 * cycle_every_min
    with RlhfClient(target, keys["admin"]) as admin:
        while time.time() < stop_at:
            time.sleep(SAMPLE_EVERY_S)
            now = time.time() - started
            for tree, proc in (("server", server), ("trainer", trainer)):
                processes = tree_memory_mb(proc.pid)
                rss[tree].append((now, tree_rss_mb(processes)))
                per_process += [(now, tree, name, kinds) for name, kinds in processes.items()]
            if time.time() >= next_cycle:
                next_cycle += 60 * cycle_every_min
                try:
                    cycles.append(admin.trigger_cycle(reason="soak", timeout=30).cycle_id)
                except grpc.RpcError as err:
                    tally.error("trigger", err)
            print(f"  {now / 60:5.1f} min: generate {tally.ok['generate']}, rankings {tally.ok['ranking']}, "
                  f"failed {sum(tally.failed.values())}, server {rss['server'][-1][1]:.0f} MiB, "
                  f"trainer {rss['trainer'][-1][1]:.0f} MiB", flush=True)
        for t in threads:
            t.join()
        finished = {cid: admin.get_cycle(cid, timeout=30) for cid in cycles}
    return {"minutes": minutes, "cycle_every_min": cycle_every_min, "tally": tally, "generate_ok": tally.ok["generate"], "rankings_ok": tally.ok["ranking"],
            "failed": {f"{k}:{s}": n for (k, s), n in tally.failed.items()},
            "refused_by_limits": {f"{k}:{s}": n for (k, s), n in tally.refused.items()},
            "cycles": {cid: admin_pb2.CycleState.Name(c.state) for cid, c in finished.items()}, "memory": memory_figures(rss),
            "by_process": process_figures(per_process), "per_process_samples": per_process}


def memory_figures(rss: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    out = {}
    for name, samples in rss.items():
        after_warm_up = [s for s in samples if s[0] >= WARM_UP_S] or samples
        second_half = after_warm_up[len(after_warm_up) // 2:]
        first, last = after_warm_up[0][1], after_warm_up[-1][1]
        out[name] = {"after_warm_up_mb": round(first), "end_mb": round(last), "growth_mb": round(last - first),
                     "peak_mb": round(max(r for _, r in samples)),
                     "second_half_slope_mb_per_hour": round(slope_mb_per_hour(second_half), 1)}
    return out


def process_figures(samples: list[tuple[float, str, str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per process (alive after the warm-up): growth of each kind of RSS after the warm-up, and
    the slope of its anonymous memory over the second half."""
    series: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
    for t, tree, name, kinds in samples:
        if t >= WARM_UP_S:
            series.setdefault((tree, name), []).append((t, kinds))
    rows = []
    for (tree, name), points in series.items():
        if len(points) < 2:
            continue  # a short-lived child (a compile, a helper): nothing to grow
        first, last = points[0][1], points[-1][1]
        second_half = points[len(points) // 2:]
        rows.append({"tree": tree, "process": name, "minutes": round((points[-1][0] - points[0][0]) / 60, 1),
                     "end_mb": {k: round(v) for k, v in last.items()},
                     "growth_mb": {k: round(last[k] - first[k]) for k in MEMORY_KINDS},
                     "anon_second_half_slope_mb_per_hour": round(
                         slope_mb_per_hour([(t, kinds["RssAnon"]) for t, kinds in second_half]), 1)})
    return sorted(rows, key=lambda r: -sum(r["end_mb"].values()))


def write_samples(out: Path, samples: list[tuple[float, str, str, dict[str, float]]]) -> None:
    """Every memory sample as CSV, for a plot or a closer look."""
    lines = ["seconds,tree,process," + ",".join(MEMORY_KINDS)]
    lines += [f"{t:.0f},{tree},{name}," + ",".join(f"{kinds[k]:.1f}" for k in MEMORY_KINDS)
              for t, tree, name, kinds in samples]
    (out / "memory.csv").write_text("\n".join(lines) + "\n")


def markdown(r: dict[str, Any]) -> str:
    mem = r["memory"]
    rows = "\n".join(f"| {name} | {m['after_warm_up_mb']} | {m['end_mb']} | {m['growth_mb']:+} | {m['peak_mb']} | "
                     f"{m['second_half_slope_mb_per_hour']:+} |" for name, m in mem.items())
    failed = sum(r["failed"].values())
    def kinds(mb: dict[str, int], sign: str = "") -> str:
        return " / ".join(f"{mb[k]:{sign}}" for k in MEMORY_KINDS)

    process_rows = "\n".join(
        f"| {p['tree']} | {p['process']} | {kinds(p['end_mb'])} | {kinds(p['growth_mb'], '+')} | "
        f"{p['anon_second_half_slope_mb_per_hour']:+} |" for p in r["by_process"])
    return f"""`python -m bench.soak --minutes {r['minutes']:g}`: {USERS} users sending Generate ({MAX_NEW_TOKENS} tokens)
without pause, {len(LABELERS)} labelers ranking K = 4 tasks, a cycle triggered every {r['cycle_every_min']:g} minutes
(states: {r['cycles'] or 'none triggered'}).

- requests: {r['generate_ok']} Generate and {r['rankings_ok']} rankings answered; failed (not a limit):
  **{failed}** {r['failed'] or ''}; refused by a limit: {r['refused_by_limits'] or 'none'}
- acknowledged = stored: {r['acknowledged_completions']} completions acknowledged, {r['missing_completions']}
  missing from the store; {r['acknowledged_rankings']} rankings acknowledged, short by labeler:
  {r['rankings_short'] or 'none'}; the server exited with {r['server_exit']} on SIGTERM

| process tree | RSS after {WARM_UP_S / 60:g} min warm-up (MiB) | at the end | growth | peak | slope over the second half (MiB/h) |
| --- | --- | --- | --- | --- | --- |
{rows}

Each process alive after the warm-up (MiB; growth after the warm-up by kind: anonymous,
file-backed, shared; every sample in `memory.csv` of the run folder):

| tree | process | at the end (anon / file / shmem) | growth (anon / file / shmem) | anon slope, second half (MiB/h) |
| --- | --- | --- | --- | --- |
{process_rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=MINUTES)
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    parser.add_argument("--cycle-every-min", type=float, default=CYCLE_EVERY_MIN)
    args = parser.parse_args(argv)
    result = run(args.minutes, args.engine, args.cycle_every_min)
    print(result["markdown"])
    print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1, default=str))
    return 0 if not result["failed"] and not result["missing_completions"] and not result["rankings_short"] else 1


if __name__ == "__main__":
    sys.exit(main())
