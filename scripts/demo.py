"""`make demo`: the whole loop, live, on SmolLM2-135M: 3+ training cycles, a table, a plot and
a significance test.

    python scripts/demo.py [--cycles 3] [--model embedded|tiny] [--engine auto|vllm|hf] [--out DIR]
                           [--quick] [--no-demonstrations] [--set cycle.ppo.iterations=2 ...]

Two real processes, as in production: `rlhf serve` (vLLM where it installs) and
`rlhf trainer` (scripts/demo_trainer.toml). This script plays everyone else, over gRPC only:

  users       train/val/test users (split by user id) send prompts from the shipped set
  labelers    simulated labelers with a hidden rule (`concise_polite`: ~20 words, polite,
              on topic, no digits) and the paper's disagreement (each pair flipped with
              p = 0.16); four in group "A" (their rankings train) and two in the held-out
              group "B" (never trained on, as the paper's held-out labelers); K = 9; they
              also rate every completion they rank (Likert 1..7 and flags, by the same rule)
  demonstrator  in cycle 1, a training labeler's own best of 9 drafts (samples of the serving
              policy, picked by the labeler's noisy preference) for some train prompts (SFT);
              nothing is written to the rule (``--no-demonstrations``: none at all)
  operator    Admin.TriggerCycle once per cycle, then waits for it; light user traffic
              runs from the gate until the cycle ends, to count failed requests in the swap

After every promotion the serving policy answers a FIXED set of test-split prompts
greedily (beside the next cycle, which swaps only at its end). The held-out labelers compare each answer with v0's answer to the same prompt
(noisy, as they label); the hidden rule compares them without noise (the truth no model
sees). At the end: a per-cycle table, `cycles.png`, `report.md` (with the ratings per
policy version and the labelers' agreement on shared prompts), and a one-sided exact test
of the final policy against v0 on the held-out labelers' comparisons, with the prompt as
the unit (``trainer.evaluate.sign_flip_p_value``: the labelers' net preference per prompt);
the exit status is 1 unless p < 0.01. Everything lands in runs/demo-<time>/ (store,
checkpoints, logs, summary.json). `make demo` sets RLHF_DEMO_STARTED so the set-up
(environment, model, server start) is timed too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402,F401  first: gRPC's fork setting precedes `import grpc` (common/__init__.py)
import grpc  # noqa: E402

from clients.client import RlhfClient  # noqa: E402
from clients.prompts import load_prompts  # noqa: E402
from clients.simulated_labeler import NOISE_P, SimulatedLabeler, concise_polite, noisy_ranking  # noqa: E402
from common.identity import generate_api_key, hash_api_key, split_for_user  # noqa: E402
from common.store import Store, add_api_key  # noqa: E402
from rlhf.v1 import admin_pb2, feedback_pb2_grpc  # noqa: E402

SCRIPT_STARTED = time.time()
TRAINER_TOML = REPO / "scripts" / "demo_trainer.toml"
USERS = {"train": 8, "val": 3, "test": 2}
# (name, group, seed); group B is held out (demo_trainer.toml). Four A labelers side by side
# rather than fewer with more tasks: the engine turns more concurrent sequences into more
# tokens per second. Their tasks per cycle: Plan.
LABELERS = [("lab-a1", "A", 1), ("lab-a2", "A", 2), ("lab-a3", "A", 5), ("lab-a4", "A", 6),
            ("lab-b1", "B", 3), ("lab-b2", "B", 4)]
HELD_OUT = "B"
CEILING_RULE = 1 - NOISE_P  # a noisy labeler agrees with the rule this often (0.84)
CEILING_PEERS = 1 - 2 * NOISE_P * (1 - NOISE_P)  # ... and with another such labeler (0.73)
ALPHA = 0.01  # the demo fails unless the held-out labelers prefer the final policy at p < ALPHA
FINISHED = {admin_pb2.CYCLE_STATE_PROMOTED: "promoted", admin_pb2.CYCLE_STATE_REJECTED: "rejected",
            admin_pb2.CYCLE_STATE_SKIPPED: "skipped", admin_pb2.CYCLE_STATE_FAILED: "failed"}


@dataclass
class Plan:
    """How much happens per cycle (aimed at a 20-minute loop on 2 cores with the embedded
    model; measured: docs/DEMO.md).

    Rankings: the reward model of the first cycle must see at least 2,000 pairwise
    comparisons (below that, reward models stay near chance: Gao et al. 2022; here
    ``python -m bench.reward_curve``), so the first cycle's data is larger: 96 tasks of
    K = 9 by the training labelers, about 55 of them on train-split prompts (36 pairs
    each); later cycles add 48. The queue spreads tasks over the cycle's train and val
    prompts: train-split rankings train PPO's RM, and the gate's judge trains on every
    ranking but those of the prompts the gate evaluates on (the first 16 val prompts),
    which measure it.
    """

    cycles: int
    first_train_prompts: int = 32  # new train-split prompts in the first cycle (PPO's data, most rankings)
    first_val_prompts: int = 24  # ... val-split: the gate's evaluation prompts (16) and more rankings for the judge
    train_prompts: int = 20  # ... in each later cycle
    val_prompts: int = 12
    first_tasks_a: int = 24  # labeling tasks per training labeler (4 of them) in the first cycle
    tasks_a: int = 12  # ... in each later cycle
    tasks_b: int = 4  # per held-out labeler (2), every cycle: they only measure
    label_k: int = 9  # completions per labeling task: C(9, 2) = 36 pairs for 9 samples
    # 64 tokens: per sampling second the RM learnt as much as from 128-token samples
    # (bench.reward_curve, docs/BENCHMARKS.md), and each completion costs the RM's frozen
    # trunk half as much; at 40 tokens (the users' replies) samples barely differed in length.
    label_max_new_tokens: int = 64
    # The fixed measurement set (vN vs v0, greedy). 128: with 64, a policy the noise-free rule
    # preferred on 70% of the prompts passed the prompt-level test half the time (0.487 of
    # simulated verdicts; 128 prompts: 0.869; python -m bench.verdict_power).
    test_prompts: int = 128
    demonstrations: int = 16  # cycle 1 only (0: --no-demonstrations)
    max_new_tokens: int = 40  # users' replies (PPO's rollouts and evaluation: demo_trainer.toml)

    def prompts(self, n: int) -> tuple[int, int]:
        """(train, val) prompts the users send before cycle n."""
        return (self.first_train_prompts, self.first_val_prompts) if n == 1 else (self.train_prompts, self.val_prompts)

    def tasks(self, n: int, group: str) -> int:
        """Labeling tasks per labeler of ``group`` before cycle n."""
        if group == HELD_OUT:
            return self.tasks_b
        return self.first_tasks_a if n == 1 else self.tasks_a


def QUICK_PLAN(cycles: int) -> Plan:
    """A plan a few times smaller than the real one (``--quick``)."""
    return Plan(cycles, first_train_prompts=8, first_val_prompts=6, train_prompts=6, val_prompts=4, first_tasks_a=3,
                tasks_a=2, tasks_b=1, test_prompts=8, demonstrations=4)


# The trainer's data minimums and stage sizes for QUICK_PLAN.
QUICK_TRAINER = ["cycle.data.min_new_prompts=4", "cycle.data.min_train_comparisons=2", "cycle.data.min_val_comparisons=1",
                 "cycle.data.min_sft_demonstrations=2", "cycle.eval.max_prompts=2", "cycle.ppo.iterations=1",
                 "cycle.ppo.rollouts_per_iteration=4", "cycle.ppo.max_new_tokens=8", "cycle.eval.max_new_tokens=8",
                 "cycle.gate.min_judge_accuracy=none", "cycle.sft.epochs=1", "cycle.sft.max_eval_prompts=2"]


@dataclass
class Demo:
    """The run: where it lives, the keys, the prompt supply, the results so far."""

    out: Path
    target: str
    keys: dict[str, str]
    users: dict[str, list[str]]
    prompts: Iterator[str]
    test_set: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[int, list[str]] = field(default_factory=dict)  # version -> greedy answers to test_set
    labeling: dict[str, Any] = field(default_factory=dict)  # labeling_report(): ratings per version, agreement


# ---------------------------------------------------------------------------- the demo, top to bottom


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = (QUICK_PLAN if args.quick else Plan)(cycles=args.cycles)
    if args.no_demonstrations:
        plan.demonstrations = 0
    if args.quick:
        args.overrides = QUICK_TRAINER + args.overrides
    demo = set_up(args, plan)
    with serving(demo, args, plan) as server, training(demo, args):
        set_up_s = time.time() - float(os.environ.get("RLHF_DEMO_STARTED") or SCRIPT_STARTED)
        print(f"set-up: {set_up_s:.0f} s (environment, model, server start; goal <= 300 s)", flush=True)
        started = time.time()
        admin = RlhfClient(demo.target, demo.keys["admin"])
        # Users and labelers never wait for the trainer: while cycle n trains on what they did
        # before it, they produce cycle n + 1's data (labeling tasks sampled from the policy
        # serving at the time, as in the paper's iterations). The test prompts are answered
        # beside the cycle that follows a version (vN beside cycle n + 1, which swaps only at
        # its end; v0 beside cycle 1), so no one waits for them but the final verdict.
        with ThreadPoolExecutor(1) as people, ThreadPoolExecutor(1) as tester:
            fed = people.submit(feed, demo, plan, 1)
            finished: FinishedCycle | None = None
            for n in range(1, plan.cycles + 1):
                data = fed.result()
                cycle_started = time.time()
                cycle_id = admin.trigger_cycle(reason=f"demo cycle {n}", request_id=f"demo-{uuid.uuid4().hex}").cycle_id
                if n < plan.cycles:
                    fed = people.submit(feed, demo, plan, n + 1)
                if n == 1:
                    demo.answers[0] = answer_test_set(demo, plan, version=0)
                    print(f"v0 answered the {len(demo.test_set)} test prompts; hidden-rule mean "
                          f"{mean([concise_polite(q, a) for q, a in zip(demo.test_set, demo.answers[0])]):.3f}",
                          flush=True)
                if finished is not None:
                    record_row(demo, finished)
                cycle, during = follow_cycle(admin, cycle_id, server, demo)
                version = serving_version(admin)
                answers = {version: tester.submit(answer_test_set, demo, plan, version)} if version not in demo.answers \
                    else {}
                start = ppo_start(cycle)  # the policy PPO began from (an SFT model the server never served)
                if start is not None and start not in demo.answers and start != version:
                    answers[start] = tester.submit(answer_offline, demo, plan, start)
                finished = FinishedCycle(n, cycle, version, data, during, time.time() - cycle_started, answers)
            if finished is not None:
                record_row(demo, finished)
        demo.labeling = labeling_report(admin)
        admin.close()
    final = max(demo.answers)
    result = compare_with_v0(demo, final)
    loop_s = time.time() - started
    report(demo, result, set_up_s, loop_s)
    if result["p_value"] >= ALPHA:
        print(f"FAILED: the held-out labelers' preference for v{final} over v0 is not significant "
              f"(p = {result['p_value']:.4f} >= {ALPHA})")
        return 1
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=3, help="training cycles (default 3)")
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded",
                        help="SmolLM2-135M-Instruct, or the tiny random model for a quick dry run")
    parser.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/demo-<time>)")
    parser.add_argument("--quick", action="store_true",
                        help="a plan a few times smaller (a dry run, and the demo's own test on the tiny model); "
                             "no learning goal holds at that size")
    parser.add_argument("--no-demonstrations", action="store_true",
                        help="no demonstrations, so no SFT: the paper's steps 2 and 3 alone (rankings -> RM -> PPO)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra trainer config override (see `rlhf trainer --print-config`)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- set-up


def set_up(args: argparse.Namespace, plan: Plan) -> Demo:
    """Run folder, model, API keys (admin, labelers by group, users by split), prompt supply."""
    out = args.out or REPO / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    (out / "data").mkdir(parents=True, exist_ok=True)
    args.model_dir = model_folder(args.model, out)
    keys, users = {"admin": generate_api_key()}, {}
    with Store(out / "data" / "rlhf.sqlite") as store:
        store.write_sync(add_api_key("operator", "admin", hash_api_key(keys["admin"])))
        for name, group, _ in LABELERS:
            keys[name] = generate_api_key()
            store.write_sync(add_api_key(name, "labeler", hash_api_key(keys[name]), labeler_group=group))
        for split, n in USERS.items():
            users[split] = users_in(split, n)
            for user in users[split]:
                keys[user] = generate_api_key()
                store.write_sync(add_api_key(user, "user", hash_api_key(keys[user])))
    texts = [p.text for p in load_prompts()]
    needed = plan.test_prompts + sum(sum(plan.prompts(n)) for n in range(1, plan.cycles + 1))
    if needed > len(texts):
        raise SystemExit(f"{plan.cycles} cycles need {needed} prompts; the shipped set has {len(texts)}")
    return Demo(out, f"127.0.0.1:{free_port()}", keys, users, iter(texts[plan.test_prompts:]),
                texts[:plan.test_prompts])


def model_folder(which: str, out: Path) -> Path:
    from common import paths
    from common.models import build_tiny_model, ensure_embedded_model

    if which == "tiny":
        return build_tiny_model(paths.models_dir() / "tiny-llama-seed0", seed=0)
    return ensure_embedded_model()


def users_in(split: str, n: int) -> list[str]:
    """The first n ids `demo-user-<i>` whose prompts belong to `split` (splits are by user)."""
    ids = (f"demo-user-{i}" for i in itertools.count())
    return list(itertools.islice((u for u in ids if split_for_user(u) == split), n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- processes


class Process:
    """A child process with its log file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, args: list[str], out: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, out / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited ({self.proc.returncode}); its log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class serving:
    """`rlhf serve` on the demo's store, until the block ends (labeling tasks sampled with
    `Plan.label_max_new_tokens`)."""

    def __init__(self, demo: Demo, args: argparse.Namespace, plan: Plan) -> None:
        self.demo, self.args, self.plan = demo, args, plan

    def __enter__(self) -> Process:
        data, port = self.demo.out / "data", self.demo.target.rsplit(":", 1)[1]
        self.process = Process("server", [
            "-m", "server.app", "--engine", self.args.engine, "--port", port, "--store-path", str(data / "rlhf.sqlite"),
            "--checkpoints-root", str(data / "checkpoints"), "--base-model-dir", str(self.args.model_dir),
            "--base-model-name", self.args.model_dir.name,
            "--label-max-new-tokens", str(self.plan.label_max_new_tokens)], self.demo.out)
        print(f"starting the server ({self.args.engine} engine) on {self.demo.target} ...", flush=True)
        wait_until_serving(self.demo, self.process)
        return self.process

    def __exit__(self, *exc: object) -> None:
        self.process.stop()


def wait_until_serving(demo: Demo, process: Process, timeout: float = 600) -> None:
    with RlhfClient(demo.target, demo.keys["admin"]) as client:
        try:
            client.wait_until_serving(timeout, alive=lambda: process.proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            process.check()  # exits with the server's log when it died
            raise SystemExit(f"{exc}; see {process.log}") from None


class training:
    """`rlhf trainer` (schedule off: the demo triggers each cycle), until the block ends."""

    def __init__(self, demo: Demo, args: argparse.Namespace) -> None:
        self.demo, self.args = demo, args

    def __enter__(self) -> Process:
        data = self.demo.out / "data"
        overrides = [f"store_path={data / 'rlhf.sqlite'}", f"checkpoints_root={data / 'checkpoints'}",
                     f"work_dir={data / 'trainer'}", f"server_address={self.demo.target}", "schedule=off",
                     *self.args.overrides]
        argv = ["-m", "trainer.service", "--config", str(TRAINER_TOML)]
        argv += [item for o in overrides for item in ("--set", o)]
        self.process = Process("trainer", argv, self.demo.out, {"RLHF_ADMIN_KEY": self.demo.keys["admin"]})
        return self.process

    def __exit__(self, *exc: object) -> None:
        self.process.stop()


# ---------------------------------------------------------------------------- the people


def send_traffic(demo: Demo, plan: Plan, n_cycle: int) -> dict[str, Any]:
    """New prompts from train and val users (16 at a time, so the engine batches them)."""
    train, val = plan.prompts(n_cycle)
    jobs = [(user, next(demo.prompts)) for split, n in (("train", train), ("val", val))
            for user in itertools.islice(itertools.cycle(demo.users[split]), n)]

    def ask(job: tuple[str, str]) -> tuple[str, str] | None:
        user, text = job
        with RlhfClient(demo.target, demo.keys[user]) as client:
            try:
                reply = client.generate(text, max_new_tokens=plan.max_new_tokens, temperature=0.7, timeout=300)
            except grpc.RpcError as err:
                print(f"  a user's request failed: {err.code().name}: {err.details()}", flush=True)
                return None
        return reply.prompt_id, text

    with ThreadPoolExecutor(16) as pool:
        done = list(pool.map(ask, jobs))
    train_ids = {reply[0] for (user, _), reply in zip(jobs, done) if reply is not None and user in demo.users["train"]}
    return {"prompts": len(done), "failed": done.count(None), "train_prompt_ids": train_ids}


def label(demo: Demo, plan: Plan, n_cycle: int, train_prompt_ids: set[str]) -> dict[str, Any]:
    """The labelers work the Feedback queue side by side (each task: K = 9 fresh samples of the
    serving policy). In the first cycle, training labelers also write demonstrations for
    train-split prompts (SFT's data): the best of each task's drafts by their own preference
    (``SimulatedLabeler.best_completion``)."""
    demonstrators = [lab for lab in LABELERS if lab[1] != HELD_OUT]
    per_demonstrator = -(-plan.demonstrations // len(demonstrators)) if n_cycle == 1 else 0

    def work(labeler: tuple[str, str, int]) -> Any:
        name, group, seed = labeler
        metadata = (("authorization", f"Bearer {demo.keys[name]}"),)
        demos = per_demonstrator if labeler in demonstrators else 0
        with grpc.insecure_channel(demo.target) as channel:
            stub = feedback_pb2_grpc.FeedbackStub(channel)
            # a new random stream per cycle: the lapses of attention differ from cycle to cycle
            return SimulatedLabeler(p=NOISE_P, seed=1000 * seed + n_cycle, labeler_group=group,
                                    metadata=metadata).run(stub, plan.tasks(n_cycle, group), k=plan.label_k,
                                                           timeout=300, demonstrations=demos,
                                                           demonstrate_on=train_prompt_ids, rate=True)

    with ThreadPoolExecutor(len(LABELERS)) as pool:
        reports = list(pool.map(work, LABELERS))
    return {"rankings": sum(r.submitted for r in reports), "pairs": sum(r.comparisons for r in reports),
            "demos": sum(r.demonstrations for r in reports), "ratings": sum(r.ratings for r in reports)}


def labeling_report(admin: RlhfClient) -> dict[str, Any]:
    """The labelers' ratings per policy version (Admin.GetRatingsReport: the paper's Fig. 4)
    and their agreement on the prompts several of them ranked (Admin.GetLabelerQuality)."""
    ratings = admin.admin.GetRatingsReport(admin_pb2.GetRatingsReportRequest(), metadata=admin.metadata, timeout=60)
    quality = admin.admin.GetLabelerQuality(admin_pb2.GetLabelerQualityRequest(), metadata=admin.metadata,
                                            timeout=60)  # fmt: skip
    overall = quality.overall
    return {"ratings": [{"version": v.policy_version, "ratings": v.ratings, "mean_overall": v.mean_overall,
                         "flag_share": dict(v.flag_share)} for v in ratings.versions],
            "agreement": {"shared_sets": overall.shared_tasks, "pairs": overall.pairs,
                          "share": overall.pairwise_agreement if overall.HasField("pairwise_agreement") else None,
                          "alpha": overall.krippendorff_alpha if overall.HasField("krippendorff_alpha") else None}}


def feed(demo: Demo, plan: Plan, n: int) -> dict[str, Any]:
    """One cycle's worth of people: users' prompts, then labelers' rankings (and, before the
    first cycle, demonstrations)."""
    traffic = send_traffic(demo, plan, n)
    return {"prompts": traffic["prompts"], "failed": traffic["failed"],
            **label(demo, plan, n, traffic["train_prompt_ids"])}


def follow_cycle(admin: RlhfClient, cycle_id: int, server: Process, demo: Demo) -> tuple[admin_pb2.Cycle, dict]:
    """Follow a triggered cycle's stages until it finishes. From the gate on (publish and
    swap follow), users keep querying, so failed requests across the hot-swap are counted."""
    stage, traffic = None, None
    try:
        while (cycle := admin.get_cycle(cycle_id)).state not in FINISHED:
            server.check()
            if cycle.stage != stage:
                stage = cycle.stage
                print(f"  cycle {cycle_id}: {stage or 'queued'}", flush=True)
            if traffic is None and stage in ("gate", "publish", "swap"):
                traffic = BackgroundTraffic(demo)
            time.sleep(0.25)
    finally:
        during = traffic.stop() if traffic else {"requests": 0, "failed": 0, "versions": []}
    return cycle, during


class BackgroundTraffic:
    """Four test-split users querying back to back until stopped: failures and versions seen."""

    def __init__(self, demo: Demo, clients: int = 4) -> None:
        self.demo, self.stopping = demo, threading.Event()
        self.requests, self.failures, self.versions = 0, [], []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._user, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _user(self, i: int) -> None:
        user = self.demo.users["test"][i % len(self.demo.users["test"])]
        with RlhfClient(self.demo.target, self.demo.keys[user]) as client:
            while not self.stopping.is_set():
                try:
                    reply = client.generate(self.demo.test_set[i], max_new_tokens=16, temperature=0.7, timeout=60)
                    outcome = reply.completions[0].policy_version
                except grpc.RpcError as err:
                    outcome = f"{err.code().name}: {err.details()}"
                with self.lock:
                    self.requests += 1
                    (self.versions if isinstance(outcome, int) else self.failures).append(outcome)

    def stop(self) -> dict[str, Any]:
        time.sleep(2.0)  # a few more requests after the swap: they must come from the new version
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)
        return {"requests": self.requests, "failed": len(self.failures), "errors": self.failures[:5],
                "versions": sorted(set(self.versions))}


def serving_version(admin: RlhfClient) -> int:
    return admin.get_stats().serving_version


def answer_test_set(demo: Demo, plan: Plan, version: int) -> list[str]:
    """The serving policy's greedy answers to the fixed test prompts (the test-split users
    ask, 8 at a time each); every answer must come from ``version``."""
    askers = demo.users["test"]

    def answer(job: tuple[int, str]) -> str:
        i, text = job
        with RlhfClient(demo.target, demo.keys[askers[i % len(askers)]]) as client:
            reply = client.generate(text, max_new_tokens=plan.max_new_tokens, temperature=0.0, timeout=300)
        completion = reply.completions[0]
        if completion.policy_version != version:
            raise RuntimeError(f"a test answer came from v{completion.policy_version}, not v{version}")
        return completion.text

    # One pool of 8 per user: the server allows 8 calls in flight per key.
    pools = [ThreadPoolExecutor(8) for _ in askers]
    try:
        futures = [pools[i % len(askers)].submit(answer, (i, text)) for i, text in enumerate(demo.test_set)]
        return [f.result() for f in futures]
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)


def compare_with_v0(demo: Demo, version: int) -> dict[str, Any]:
    """vN vs v0 on the test prompts (``compare_versions``)."""
    return compare_versions(demo, version, 0)


def compare_versions(demo: Demo, version: int, other: int) -> dict[str, Any]:
    """vN vs another version on the test prompts: every held-out labeler judges every pair
    (noisy, as they label), and the hidden rule judges it without noise. The p-value is the
    prompt-level one-sided exact test of the labelers' net preferences (``sign_flip_p_value``:
    two labelers judging the same pair of answers are not two independent samples; ties carry
    no comparison). ``p_value_pooled`` is the binomial test on the pooled strict preferences,
    the demo's test until 2026-12-05, kept so older runs can be compared."""
    from trainer.evaluate import binomial_sf_one_sided, sign_flip_p_value

    pairs = list(zip(demo.test_set, demo.answers[version], demo.answers[other]))
    scores = [(concise_polite(q, new), concise_polite(q, old)) for q, new, old in pairs]  # (vN, other) per prompt
    wins = losses = 0
    net = [0] * len(scores)  # per prompt: the held-out labelers' wins minus losses for vN
    for _, _, seed in [lab for lab in LABELERS if lab[1] == HELD_OUT]:
        rng = random.Random(1000 * seed + version if other == 0 else 1_000_003 * seed + 1000 * version + other)
        for i, pair in enumerate(scores):
            if pair[0] == pair[1]:
                continue  # a tie under the rule: the labeler passes (SimulatedLabeler.rank does too)
            order = noisy_ranking(list(pair), NOISE_P, rng)
            won, lost = order[0] == [0], order[0] == [1]
            wins, losses, net[i] = wins + won, losses + lost, net[i] + won - lost
    return {"version": version, "other": other, "held_out_wins": wins, "held_out_losses": losses,
            "held_out_win_rate": wins / (wins + losses) if wins + losses else None,
            "p_value": sign_flip_p_value(net), "p_value_pooled": binomial_sf_one_sided(wins, wins + losses),
            "rule_win_rate": rule_win_rate(scores),
            "hidden_rule_mean": mean([new for new, _ in scores]),
            "hidden_rule_mean_v0": mean([old for _, old in scores]),
            "mean_words": mean([len(a.split()) for _, a, _ in pairs])}


def gate_rule_win_rate(examples: list[dict[str, Any]]) -> float | None:
    """The noise-free rule's win rate of the candidate's answers over the serving policy's on
    the gate's own prompts (the answers its judge scored, kept by ``cycle.eval.keep_answers``;
    ties count half): whether the gate's call, a refusal included, was the rule's."""
    if not examples:
        return None
    return rule_win_rate([(concise_polite(e["prompt"], e["candidate"]), concise_polite(e["prompt"], e["serving"]))
                          for e in examples])


def rule_win_rate(scores: list[tuple[float, float]]) -> float:
    """How often the first of each (new, old) pair of the rule's scores is the higher, ties
    half (``trainer.evaluate.win_rate``, the gate's measure)."""
    import torch

    from trainer.evaluate import win_rate

    new_scores, old_scores = (torch.tensor(column) for column in zip(*scores))
    return win_rate(new_scores, old_scores)


# ---------------------------------------------------------------------------- results


@dataclass
class FinishedCycle:
    """A cycle that ended; its row waits for the test answers of the version serving after it."""

    n: int
    cycle: admin_pb2.Cycle
    version: int
    data: dict[str, Any]
    during: dict[str, Any]
    seconds: float
    answers: dict[int, Future]  # test answers of versions not answered before (the serving one, PPO's start)


def record_row(demo: Demo, done: FinishedCycle) -> None:
    for version, future in done.answers.items():
        demo.answers[version] = future.result()
    effect = ppo_effect(demo, done.cycle, done.version)
    row = summarise(done.n, done.cycle, done.version, compare_with_v0(demo, done.version), effect, done.data,
                    done.during, done.seconds)
    demo.rows.append(row)
    print_row(row, header=done.n == 1)


def ppo_start(cycle: admin_pb2.Cycle) -> int | None:
    """The version PPO started from in this cycle (the lineage's start), when it ran."""
    lineage = json.loads(cycle.metrics_json or "{}").get("sft", {}).get("lineage", {})
    return lineage.get("start_version")


def ppo_effect(demo: Demo, cycle: admin_pb2.Cycle, version: int) -> dict[str, Any]:
    """What this cycle's PPO step did, when it was promoted: the new version against the policy
    PPO started from (the SFT model, or the serving one) and against the version it replaced."""
    if FINISHED[cycle.state] != "promoted":
        return {}
    start, replaced = ppo_start(cycle), cycle.base_version
    out = {"start": start, "replaced": replaced}
    if start is not None and start in demo.answers:
        out["vs_start"] = compare_versions(demo, version, start)
    if replaced in demo.answers:
        out["vs_replaced"] = compare_versions(demo, version, replaced)
    return out


def answer_offline(demo: Demo, plan: Plan, version: int) -> list[str]:
    """Greedy answers to the test prompts of a version the server never served (an SFT model),
    with transformers in this process: its fp32 greedy decoding is vLLM's (MACHINE-FACTS)."""
    from common.checkpoints import checkpoint_path
    from common.models import load_causal_lm, load_tokenizer
    from trainer.examples import user_turn
    from trainer.evaluate import sample_responses

    folder = checkpoint_path(demo.out / "data" / "checkpoints", version)
    model, tokenizer = load_causal_lm(folder, dtype="float32", device="cpu"), load_tokenizer(folder)
    return sample_responses(model, tokenizer, [user_turn(q) for q in demo.test_set],
                            max_new_tokens=plan.max_new_tokens, temperature=0.0, batch_size=16)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def newest_version(by_version: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures of the newest policy version in a ``{version: figures}`` map (versions are
    JSON keys, so compared as numbers: "10" is newer than "2"); ``{}`` when there is none.

    The RM's accuracy on the held-out labelers' rankings of the newest policy's samples: the
    policy serving while the previous cycle trained (people work for cycle n + 1 while cycle n
    trains), so after a promotion not yet the one serving when this cycle began."""
    return by_version[max(by_version, key=int)] if by_version else {}


def summarise(n: int, cycle: admin_pb2.Cycle, version: int, vs_v0: dict[str, Any], effect: dict[str, Any],
              data: dict, during: dict, seconds: float) -> dict[str, Any]:
    m = json.loads(cycle.metrics_json or "{}")
    rm, ev = m.get("rm", {}).get("rm", {}), m.get("evaluate", {})
    by_group = rm.get("val", {}).get("by_group", {})
    newest = newest_version(rm.get("val", {}).get("by_group_version", {}).get(HELD_OUT, {}))
    vs_start, vs_replaced = effect.get("vs_start", {}), effect.get("vs_replaced", {})
    return {
        "cycle": n, "id": cycle.cycle_id, "state": FINISHED[cycle.state], "serving": version,
        "candidate": cycle.candidate_version if cycle.HasField("candidate_version") else None,
        "prompts": data["prompts"], "rankings": data["rankings"], "demos": data["demos"],
        "sft": m.get("sft", {}).get("ran"),
        "rm_acc_A": by_group.get("A", {}).get("accuracy"), "rm_acc_B": by_group.get(HELD_OUT, {}).get("accuracy"),
        "rm_acc_B_newest": newest.get("accuracy"), "rm_B_newest_n": newest.get("num_comparisons"),
        "rm_pairs": rm.get("num_train_pairs"),
        "judge_acc": m.get("rm", {}).get("judge", {}).get("val", {}).get("accuracy"),
        "judge_acc_B": m.get("rm", {}).get("judge", {}).get("val", {}).get("by_group", {}).get(HELD_OUT, {})
        .get("accuracy"),
        "gate_win": ev.get("judge_win_rate"), "gate_rule": gate_rule_win_rate(ev.get("examples", [])),
        "rm_score": ev.get("rm_score_candidate"), "kl": ev.get("kl_to_sft"),
        "ptx": ev.get("ptx_nll_candidate"), "ptx_reg": ev.get("ptx_regression"),
        "win_B": vs_v0["held_out_win_rate"], "p_B": vs_v0["p_value"], "win_rule": vs_v0["rule_win_rate"],
        "words": vs_v0["mean_words"], "stall": m.get("swap", {}).get("stall_seconds"),
        "ppo_start": effect.get("start"), "rule_vs_start": vs_start.get("rule_win_rate"),
        "B_vs_start": vs_start.get("held_out_win_rate"), "p_vs_start": vs_start.get("p_value"),
        "rule_vs_prev": vs_replaced.get("rule_win_rate"), "B_vs_prev": vs_replaced.get("held_out_win_rate"),
        "p_vs_prev": vs_replaced.get("p_value"), "ppo_effect": effect,
        "failed": during["failed"] + data["failed"], "during_swap": during, "vs_v0": vs_v0,
        "error": cycle.error, "stage_seconds": {k: v.get("seconds") for k, v in m.items()}, "seconds": seconds,
    }


# (column, width, what it is) -- the table printed per cycle and written to report.md
COLUMNS = [
    ("cycle", 5, "cycle number"), ("state", 8, "promoted / rejected / skipped / failed"),
    ("serving", 7, "policy version serving after the cycle"),
    ("rm_pairs", 8, "pairwise comparisons PPO's RM trained on (all train-split rankings of the training labelers)"),
    ("rm_acc_A", 8, "PPO's RM: pairwise accuracy on group A's val-split rankings (unseen)"),
    ("rm_acc_B", 8, "PPO's RM: pairwise accuracy on held-out group B's rankings (never trained on)"),
    ("rm_acc_B_newest", 15, "... on group B's rankings of the newest policy's samples (the policy serving while "
                            "the previous cycle trained: people work for the next cycle while one trains)"),
    ("rm_B_newest_n", 13, "... how many rankings that figure rests on"),
    ("judge_acc", 9, "the gate's judge: pairwise accuracy on rankings it never trained on"),
    ("gate_win", 8, "the judge's win rate of the candidate over the serving policy on the gate's prompts"),
    ("gate_rule", 9, "the noise-free rule's win rate on the same prompts and answers: was the gate's call right?"),
    ("win_B", 6, "serving vs v0 on the test prompts, judged by the held-out labelers (ties dropped)"),
    ("p_B", 7, "one-sided prompt-level test of win_B > 0.5 (sign_flip_p_value)"),
    ("win_rule", 8, "serving vs v0 judged by the noise-free hidden rule (ties count half)"),
    ("ppo_start", 9, "the version this cycle's PPO started from (its SFT model, or the serving policy)"),
    ("rule_vs_start", 13, "a promoted candidate vs its PPO start, by the noise-free rule: what PPO alone did"),
    ("B_vs_start", 10, "... by the held-out labelers (win rate, ties dropped)"),
    ("p_vs_start", 10, "one-sided prompt-level test of B_vs_start > 0.5"),
    ("rule_vs_prev", 12, "a promoted candidate vs the version it replaced, by the noise-free rule"),
    ("B_vs_prev", 9, "... by the held-out labelers"),
    ("rm_score", 8, "mean RM score of the candidate's samples on evaluation prompts"),
    ("kl", 6, "KL(candidate || SFT), nats per token, on the candidate's own samples (PPO's estimator)"),
    ("ptx", 6, "candidate's NLL on held-out pretraining text (nats/token)"),
    ("ptx_reg", 7, "ptx NLL minus the serving policy's (the alignment tax)"),
    ("words", 5, "mean words per test answer"), ("stall", 6, "swap stall (s): new requests held"),
    ("failed", 6, "failed user requests: the cycle's data traffic and the traffic across its swap"),
    ("seconds", 7, "wall time of the cycle, from its trigger to its end (swap included)"),
]


def print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(f"(RM accuracy ceiling: {CEILING_RULE:.2f} against a labeler's noisy rankings; "
              f"labelers agree with each other {CEILING_PEERS:.2f} of the time)")
        print("  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS))
    print("  ".join(f"{_cell(row[name]):>{width}}" for name, width, _ in COLUMNS), flush=True)
    if row["error"]:
        print(f"       ({row['error']})")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 0.01 and value else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def report(demo: Demo, result: dict[str, Any], set_up_s: float, loop_s: float) -> None:
    """The verdict, the plot, report.md and summary.json."""
    final = result["version"]
    verdict = (f"final v{final} vs v0 on {len(demo.test_set)} test prompts (greedy): held-out labelers prefer v{final} "
               f"{result['held_out_wins']} times, v0 {result['held_out_losses']} times "
               f"(win rate {_cell(result['held_out_win_rate'])}, one-sided p = {result['p_value']:.2g} with the prompt as "
               f"the unit; {result['p_value_pooled']:.2g} by the pooled binomial test of earlier runs); "
               f"noise-free rule win rate {result['rule_win_rate']:.3f}; hidden-rule mean "
               f"{result['hidden_rule_mean']:.3f} vs {result['hidden_rule_mean_v0']:.3f}")
    timing = f"set-up {set_up_s:.0f} s (goal <= 300 s); loop {loop_s / 60:.1f} min (goal <= 20 min)"
    print(f"\n{verdict}\n{timing}")
    plot(demo, demo.out / "cycles.png")
    (demo.out / "report.md").write_text(markdown_report(demo, verdict, timing))
    summary = {"rows": demo.rows, "final_vs_v0": result, "answers": demo.answers, "test_prompts": demo.test_set,
               "set_up_seconds": set_up_s, "loop_seconds": loop_s, "noise_p": NOISE_P, "labeling": demo.labeling}
    (demo.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"plot {demo.out / 'cycles.png'}; report {demo.out / 'report.md'}; details {demo.out / 'summary.json'}")


def markdown_report(demo: Demo, verdict: str, timing: str) -> str:
    final = max(demo.answers)
    lines = ["# rlhf-loop demo run", "", verdict + ".", "", timing + ".", "",
             "| " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[name]) for name, _, _ in COLUMNS) + " |" for row in demo.rows]
    lines += ["", f"RM accuracy ceiling: {CEILING_RULE:.2f} (a labeler flips each pair with p = {NOISE_P}); "
              f"two labelers agree {CEILING_PEERS:.2f} of the time.", ""]
    lines += [f"- `{name}`: {meaning}" for name, _, meaning in COLUMNS]
    lines += ratings_section(demo.labeling)
    lines += look_around(demo.out)
    lines += ["", f"## Three test prompts, v0 and v{final} (greedy)", ""]
    for q, old, new in list(zip(demo.test_set, demo.answers[0], demo.answers[final]))[:3]:
        lines += [f"**{q}**", "", f"- v0: {old.strip()!r}", f"- v{final}: {new.strip()!r}", ""]
    return "\n".join(lines)


def look_around(out: Path) -> list[str]:
    """report.md's instructions to serve the run's final policy again and label it in the
    browser (the demo's own processes are gone when the report is read)."""
    data = out / "data"
    return ["", "## Look around yourself", "",
            "Serve the run's store and its latest policy, make yourself a labeler key, and label in the browser:", "",
            "```",
            f"rlhf serve --store-path {data / 'rlhf.sqlite'} --checkpoints-root {data / 'checkpoints'} &",
            f"rlhf keys --store {data / 'rlhf.sqlite'} create --role labeler --user you --group A",
            "rlhf web --server 127.0.0.1:50051      # prints its URL; sign in with the key",
            "rlhf cycles     # with RLHF_API_KEY set to an admin key (`rlhf keys ... create --role admin`)",
            "```"]


def ratings_section(labeling: dict[str, Any], top_flags: int = 3) -> list[str]:
    """report.md's ratings per policy version (mean Likert, most frequent flags) and the
    labelers' agreement on shared prompts; nothing when the run has no labeling report."""
    if not labeling:
        return []
    lines = ["", "## The labelers' ratings per policy version", "",
             "| version | ratings | mean Likert (1..7) | most frequent flags |", "| --- | --- | --- | --- |"]
    for v in labeling["ratings"]:
        flags = sorted(((share, name) for name, share in v["flag_share"].items() if share > 0), reverse=True)
        shown = ", ".join(f"{name} {share:.0%}" for share, name in flags[:top_flags]) or "none"
        lines.append(f"| v{v['version']} | {v['ratings']} | {v['mean_overall']:.2f} | {shown} |")
    agreement = labeling["agreement"]
    share = "-" if agreement["share"] is None else f"{agreement['share']:.1%}"
    lines += ["", f"Labelers agreed on {share} of the {agreement['pairs']} pairs of the {agreement['shared_sets']} "
              f"completion sets several of them ranked (Krippendorff's alpha {_cell(agreement['alpha'])}); "
              f"expected {CEILING_PEERS:.1%} at p = {NOISE_P}; InstructGPT's labelers agreed 72.6 ± 1.5%."]
    return lines


def plot(demo: Demo, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = demo.rows
    cycles = [r["cycle"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([0] + cycles, [0.5] + [r["win_B"] for r in rows], "o-", label="held-out labelers")
    axes[0].plot([0] + cycles, [0.5] + [r["win_rule"] for r in rows], "s--", label="hidden rule (no noise)")
    axes[0].axhline(0.5, ls=":", c="grey")
    axes[0].set(title="serving policy vs v0 on test prompts", xlabel="cycle", ylabel="win rate", ylim=(0, 1))
    axes[0].legend()
    for key, label in (("rm_acc_A", "RM, group A (val)"), ("rm_acc_B", "RM, group B (held out)")):
        axes[1].plot(cycles, [r[key] for r in rows], "o-", label=label)
    axes[1].axhline(CEILING_RULE, ls="--", c="grey", label=f"ceiling 1 - p = {CEILING_RULE:.2f}")
    axes[1].axhline(CEILING_PEERS, ls=":", c="grey", label=f"labeler agreement {CEILING_PEERS:.2f}")
    axes[1].set(title="reward-model accuracy", xlabel="cycle", ylim=(0.3, 1.0))
    axes[1].legend()
    axes[2].plot(cycles, [r["kl"] for r in rows], "o-", label="KL to SFT (nats/token)")
    axes[2].plot(cycles, [r["ptx"] for r in rows], "s-", label="ptx NLL (nats/token)")
    axes[2].set(title="drift and the alignment tax", xlabel="cycle")
    axes[2].legend()
    for ax in axes:  # whole cycles only
        ax.set_xticks(range(0 if ax is axes[0] else 1, max(cycles, default=1) + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
