"""Rankings per second accepted over gRPC, against a bare echo service on the same machine.

Setup: a server process (the FeedbackServicer on a fresh store: the real auth, the real
validation, one transaction per ranking with its lease and idempotency record, answered
only after COMMIT, synchronous=FULL) and 8 client PROCESSES, each a labeler with its own
API key, each keeping `in_flight` SubmitRanking calls open. Prompts, their K = 4
completions and a lease per prompt are written straight into the store beforehand, so
the figure is SubmitRanking, not generation. The baseline is the same clients against a
bare echo service (the same method and messages, answered at once: no auth, no store),
measured in the same run. Goal: ratio >= 0.5.

    python -m bench.feedback                    # the benchmark (markdown on stdout)
    python -m bench.feedback serve --store S --port-file F [--echo]   # a server alone

`serve` is also what tests/test_feedback_load.py starts and kills.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import grpc

from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

CLIENTS = 8
IN_FLIGHT = 4
SECONDS = 8.0
K = 4
TASKS_PER_CLIENT = 1500
GOAL = 0.5

# A unit of work: (task_id or "", prompt_id, completion ids).
Work = tuple[str, str, list[str]]


# ---------------------------------------------------------------- servers


class EchoFeedback(feedback_pb2_grpc.FeedbackServicer):
    """The baseline: SubmitRanking answered at once, nothing checked or stored."""

    async def SubmitRanking(self, request: feedback_pb2.SubmitRankingRequest, context: Any) -> feedback_pb2.SubmitRankingResponse:
        return feedback_pb2.SubmitRankingResponse(ranking_id=request.request_id, comparisons=len(request.ranking))


def submit_only_engine() -> Any:
    """An engine that samples nothing: this server only takes submissions."""
    from server.engines.base import Engine, EngineError

    class SubmitOnlyEngine(Engine):
        name = "none"
        version = 0  # type: ignore[assignment]
        model_name = "none"  # type: ignore[assignment]

        async def start(self) -> None: ...
        def render_chat(self, messages: Any) -> list[int]:
            raise EngineError("this server samples nothing")
        def generate(self, request_id: str, prompt_token_ids: list[int], options: Any) -> Any:
            raise EngineError("this server samples nothing")
        async def abort(self, request_id: str) -> None: ...
        async def swap(self, checkpoint_dir: Any, version: int) -> Any:
            raise EngineError("this server samples nothing")
        async def check_health(self) -> bool:
            return True
        async def shutdown(self) -> None: ...

    return SubmitOnlyEngine()


async def serve(store_path: Path | None, port_file: Path, echo: bool = False) -> None:
    """Serve Feedback (or the echo baseline) on 127.0.0.1:0 until SIGTERM/SIGINT; the
    port is written to `port_file` once the server listens."""
    server = grpc.aio.server()
    store = None
    if echo:
        feedback_pb2_grpc.add_FeedbackServicer_to_server(EchoFeedback(), server)
    else:
        from common.store import Store
        from server.app import FEEDBACK, server_deps
        from server.config import ServerConfig

        store = Store(store_path)  # type: ignore[arg-type]
        deps = server_deps(ServerConfig(store_path=store.path), submit_only_engine(), store)
        deps.engine_ready.set()  # the submit-only engine has nothing to load
        FEEDBACK.add_to_server(deps, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2)
    if store is not None:
        store.close()


def start_server(store_path: Path | None, echo: bool = False, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """`python -m bench.feedback serve` in a subprocess; (process, target) once it listens."""
    port_file = Path(tempfile.mkdtemp(prefix="feedback-port-")) / "port"
    cmd = [sys.executable, "-m", "bench.feedback", "serve", "--port-file", str(port_file)]
    cmd += ["--echo"] if echo else ["--store", str(store_path)]
    process = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the {'echo' if echo else 'feedback'} server did not start (exit {process.poll()})")
        time.sleep(0.05)
    return process, f"127.0.0.1:{port_file.read_text()}"


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------- seeding


def seed(store_path: Path, labelers: Sequence[tuple[str, str]], tasks_per_labeler: int, k: int = K) -> dict[str, Any]:
    """Keys for `labelers` [(user id, group)], and per labeler `tasks_per_labeler` prompts
    with k completions each and a live lease: {"keys": {user: key}, "work": {user: [Work]}}."""
    from sqlite_utils import Database

    from common.identity import generate_api_key, hash_api_key, split_for_user
    from common.store import Store, add_api_key

    train_user = next(f"bench-user-{i}" for i in range(1000) if split_for_user(f"bench-user-{i}") == "train")
    keys = {user: generate_api_key() for user, _ in labelers}
    now = time.time()

    def op(db: Database) -> dict[str, list[Work]]:
        work: dict[str, list[Work]] = {}
        for user, group in labelers:
            add_api_key(user, "labeler", hash_api_key(keys[user]), labeler_group=group)(db)
            items = []
            for t in range(tasks_per_labeler):
                prompt_id, task_id = uuid.uuid4().hex, uuid.uuid4().hex
                ids = [uuid.uuid4().hex for _ in range(k)]
                db.conn.execute(
                    "INSERT INTO prompts (id, user_id, text, source, split, dedup_key, created_at) "
                    "VALUES (?, ?, ?, 'traffic', 'train', ?, ?)",
                    [prompt_id, train_user, f"prompt {user} {t}", f"prompt {user} {t}", now])  # fmt: skip
                db.conn.executemany(
                    "INSERT INTO completions (id, prompt_id, idx, policy_version, text, finish_reason, "
                    "prompt_tokens, completion_tokens, latency_s, purpose, created_at) "
                    "VALUES (?, ?, ?, 0, ?, 'stop', 8, 16, 0.1, 'label', ?)",
                    [(cid, prompt_id, i, f"completion {i} of {t}", now) for i, cid in enumerate(ids)])  # fmt: skip
                db.conn.execute(
                    "INSERT INTO comparison_tasks (id, prompt_id, labeler_id, k, completion_ids_json, "
                    "status, created_at, expires_at) VALUES (?, ?, ?, ?, ?, 'leased', ?, ?)",
                    [task_id, prompt_id, user, k, json.dumps(ids), now, now + 3600])  # fmt: skip
                items.append((task_id, prompt_id, ids))
            work[user] = items
        return work

    with Store(store_path) as store:
        work = store.write_sync(op)
    return {"keys": keys, "work": work}


# ---------------------------------------------------------------- clients


def random_ranking(ids: Sequence[str], rng: random.Random) -> list[list[str]]:
    """A random best-first order of `ids`, with an occasional tie (never all tied)."""
    order = list(ids)
    rng.shuffle(order)
    groups = [[order[0]]]
    for cid in order[1:]:
        if rng.random() < 0.2:
            groups[-1].append(cid)
        else:
            groups.append([cid])
    return groups if len(groups) > 1 else [[cid] for cid in order]


async def _submit_loop(target: str, key: str, work: list[Work], seconds: float, in_flight: int, seed_: int) -> tuple[int, int]:
    """Submit rankings for `seconds` with `in_flight` calls open; (acknowledged, refused)."""
    rng = random.Random(seed_)
    metadata = (("authorization", f"Bearer {key}"),)
    acked = refused = 0
    position = 0
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)

        async def worker() -> None:
            nonlocal acked, refused, position
            while time.monotonic() < deadline:
                task_id, prompt_id, ids = work[position % len(work)]
                use_task = position < len(work)  # tasks first, then rankings by prompt id
                position += 1
                request = feedback_pb2.SubmitRankingRequest(
                    request_id=uuid.uuid4().hex, task_id=task_id if use_task else "", prompt_id=prompt_id,
                    ranking=[feedback_pb2.RankGroup(completion_ids=g) for g in random_ranking(ids, rng)])  # fmt: skip
                try:
                    await stub.SubmitRanking(request, metadata=metadata, timeout=30)
                    acked += 1
                except grpc.aio.AioRpcError:
                    refused += 1

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return acked, refused


def _client_main(target: str, key: str, work: list[Work], seconds: float, in_flight: int, seed_: int,
                 start_at: float, results: Any) -> None:  # fmt: skip
    time.sleep(max(0.0, start_at - time.time()))
    results.put(asyncio.run(_submit_loop(target, key, work, seconds, in_flight, seed_)))


def drive(target: str, keys: dict[str, str], work: dict[str, list[Work]], seconds: float, in_flight: int) -> dict[str, float]:
    """Run one client process per labeler for `seconds`; acknowledged calls per second."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start_at = time.time() + 3.0  # every process has imported grpc and connected by then
    procs = [
        ctx.Process(target=_client_main, args=(target, keys[user], work[user], seconds, in_flight, i, start_at, results))
        for i, user in enumerate(keys)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    acked = sum(a for a, _ in outcomes)
    return {"acknowledged": acked, "refused": sum(r for _, r in outcomes), "per_second": acked / seconds}


# ---------------------------------------------------------------- the benchmark


def run(seconds: float = SECONDS, clients: int = CLIENTS, in_flight: int = IN_FLIGHT) -> dict[str, Any]:
    """Echo baseline, then the Feedback service; returns figures and a markdown section."""
    labelers = [(f"bench-labeler-{i}", "train" if i % 2 == 0 else "heldout") for i in range(clients)]
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp:
        store_path = Path(tmp) / "store.sqlite"
        started = time.perf_counter()
        seeded = seed(store_path, labelers, TASKS_PER_CLIENT)
        seed_seconds = time.perf_counter() - started
        echo_proc, echo_target = start_server(None, echo=True)
        try:
            echo = drive(echo_target, seeded["keys"], seeded["work"], seconds, in_flight)
        finally:
            stop_server(echo_proc)
        proc, target = start_server(store_path)
        try:
            feedback = drive(target, seeded["keys"], seeded["work"], seconds, in_flight)
        finally:
            stop_server(proc)
        stored = _count_rankings(store_path)
    ratio = feedback["per_second"] / echo["per_second"] if echo["per_second"] else 0.0
    result = {
        "clients": clients, "in_flight_per_client": in_flight, "seconds": seconds,
        "echo_per_second": echo["per_second"], "rankings_per_second": feedback["per_second"],
        "ratio": ratio, "goal": GOAL, "acknowledged": feedback["acknowledged"], "refused": feedback["refused"],
        "stored": stored, "seed_seconds": seed_seconds,
    }  # fmt: skip
    result["markdown"] = _markdown(result)
    return result


def _count_rankings(store_path: Path) -> int:
    import sqlite3

    with sqlite3.connect(store_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0]


def _markdown(r: dict[str, Any]) -> str:
    verdict = "meets" if r["ratio"] >= r["goal"] else "MISSES"
    return "\n".join([
        f"{r['clients']} client processes, {r['in_flight_per_client']} calls in flight each, {r['seconds']:.0f} s per service; "
        "each ranking acknowledged after COMMIT (synchronous=FULL), with its lease and idempotency record.",
        "",
        "| service | calls/s |",
        "| --- | --- |",
        f"| bare gRPC echo (baseline) | {r['echo_per_second']:.0f} |",
        f"| Feedback.SubmitRanking | {r['rankings_per_second']:.0f} |",
        "",
        f"Ratio {r['ratio']:.2f} ({verdict} the goal of {r['goal']}). Acknowledged {r['acknowledged']}, stored "
        f"{r['stored']}, refused {r['refused']}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve", help="run a Feedback (or echo) server until SIGTERM")
    serve_parser.add_argument("--store", type=Path)
    serve_parser.add_argument("--port-file", type=Path, required=True)
    serve_parser.add_argument("--echo", action="store_true")
    run_parser = sub.add_parser("run", help="the benchmark (the default)")
    run_parser.add_argument("--seconds", type=float, default=SECONDS)
    run_parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not args.echo and args.store is None:
            parser.error("serve needs --store (or --echo)")
        asyncio.run(serve(args.store, args.port_file, args.echo))
        return 0
    result = run(seconds=getattr(args, "seconds", SECONDS), in_flight=getattr(args, "in_flight", IN_FLIGHT))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
