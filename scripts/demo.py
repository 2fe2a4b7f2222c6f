"""`make demo`: the whole loop, live, on SmolLM2-135M: 3+ training cycles, a table, a plot and
a significance test.

    python scripts/demo.py [--cycles 3] [--model embedded|tiny] [--engine auto|vllm|hf] [--out DIR]

Two real processes, as in production: `rlhf serve` (vLLM where it installs) and
`rlhf trainer` (scripts/demo_trainer.toml). This script plays everyone else, over gRPC only:

  users       train/val/test users (split by user id) send prompts from the shipped set
  labelers    simulated labelers with a hidden rule (`concise_polite`: ~20 words, polite,
              on topic, no digits) and the paper's disagreement (each pair flipped with
              p = 0.16); group "A" and a held-out-style group "B"; K = 4 per task
  demonstrator  writes rule-following answers for some train prompts in cycle 1 (SFT)
  operator    Admin.TriggerCycle once per cycle, then waits for it

After every promotion the serving policy answers a FIXED set of test-split prompts
greedily; the hidden rule scores the answers (the labelers' truth, which no model sees).
At the end: a per-cycle table, `cycles.png`, and a one-sided sign test of the final
policy against v0 on those prompts (plus each cycle's judge sign test from the gate).
Everything lands in runs/demo-<time>/ (store, checkpoints, logs, summary.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

from clients.client import RlhfClient  # noqa: E402
from clients.prompts import load_prompts  # noqa: E402
from clients.simulated_labeler import SimulatedLabeler, concise_polite, content_words  # noqa: E402
from common.identity import generate_api_key, hash_api_key, split_for_user  # noqa: E402
from common.store import Store, add_api_key  # noqa: E402
from rlhf.v1 import admin_pb2, feedback_pb2, feedback_pb2_grpc  # noqa: E402

TRAINER_TOML = REPO / "scripts" / "demo_trainer.toml"
USERS = {"train": 8, "val": 3, "test": 2}
LABELERS = [("lab-a1", "A", 1), ("lab-a2", "A", 2), ("lab-b1", "B", 3)]
NOISE_P = 0.16
FINISHED = {admin_pb2.CYCLE_STATE_PROMOTED: "promoted", admin_pb2.CYCLE_STATE_REJECTED: "rejected",
            admin_pb2.CYCLE_STATE_SKIPPED: "skipped", admin_pb2.CYCLE_STATE_FAILED: "failed"}


@dataclass
class Plan:
    """How much happens per cycle (sized for ~20 minutes on 2 cores with the embedded model)."""

    cycles: int
    train_prompts: int = 40  # new train-split prompts per cycle (PPO's data)
    val_prompts: int = 12  # new val-split prompts per cycle (the judge's rankings, evaluation)
    test_prompts: int = 24  # the fixed hidden-rule measurement set
    tasks: int = 44  # labeling tasks per cycle (K = 4 fresh samples each)
    demonstrations: int = 16  # cycle 1 only
    max_new_tokens: int = 48  # users' replies (as PPO's rollouts)


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


# ---------------------------------------------------------------------------- the demo, top to bottom


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = Plan(cycles=args.cycles)
    demo = set_up(args, plan)
    started = time.time()
    with serving(demo, args) as server, training(demo, args):
        admin = RlhfClient(demo.target, demo.keys["admin"])
        baseline = measure_hidden_rule(demo, plan)
        print(f"v0 (base model): hidden-rule score {mean(baseline):.3f} on {len(baseline)} test prompts")
        scores = {0: baseline}
        for n in range(1, plan.cycles + 1):
            cycle_started = time.time()
            traffic = send_traffic(demo, plan)
            labels = label(demo, plan)
            demos = demonstrate(demo, traffic["train"][:plan.demonstrations]) if n == 1 else 0
            cycle = run_cycle(admin, n, server)
            version = serving_version(admin)
            if version not in scores:
                scores[version] = measure_hidden_rule(demo, plan)
            demo.rows.append(summarise(n, cycle, version, scores, traffic, labels, demos, time.time() - cycle_started))
            print_row(demo.rows[-1], header=n == 1)
        admin.close()
    final = max(scores)
    significance = sign_test(scores[final], scores[0])
    report(demo, scores, significance, time.time() - started)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=3, help="training cycles (default 3)")
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded",
                        help="SmolLM2-135M-Instruct, or the tiny random model for a quick dry run")
    parser.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/demo-<time>)")
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
    needed = plan.test_prompts + plan.cycles * (plan.train_prompts + plan.val_prompts)
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
    """`rlhf serve` on the demo's store, until the block ends."""

    def __init__(self, demo: Demo, args: argparse.Namespace) -> None:
        self.demo, self.args = demo, args

    def __enter__(self) -> Process:
        data, port = self.demo.out / "data", self.demo.target.rsplit(":", 1)[1]
        self.process = Process("server", [
            "-m", "server.app", "--engine", self.args.engine, "--port", port, "--store-path", str(data / "rlhf.sqlite"),
            "--checkpoints-root", str(data / "checkpoints"), "--base-model-dir", str(self.args.model_dir),
            "--base-model-name", self.args.model_dir.name], self.demo.out)
        print(f"starting the server ({self.args.engine} engine) on {self.demo.target} ...", flush=True)
        wait_until_serving(self.demo, self.process)
        return self.process

    def __exit__(self, *exc: object) -> None:
        self.process.stop()


def wait_until_serving(demo: Demo, process: Process, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    with RlhfClient(demo.target, demo.keys["admin"]) as client:
        while time.time() < deadline:
            process.check()
            try:
                if client.health_status(timeout=2) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"the server did not come up in {timeout:.0f} s; see {process.log}")


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


def send_traffic(demo: Demo, plan: Plan) -> dict[str, Any]:
    """New prompts from train and val users (8 at a time, so the engine batches them)."""
    jobs = [(user, next(demo.prompts)) for split, n in (("train", plan.train_prompts), ("val", plan.val_prompts))
            for user in itertools.islice(itertools.cycle(demo.users[split]), n)]

    def ask(job: tuple[str, str]) -> tuple[str, str]:
        user, text = job
        with RlhfClient(demo.target, demo.keys[user]) as client:
            reply = client.generate(text, max_new_tokens=plan.max_new_tokens, temperature=0.7, timeout=300)
        return reply.prompt_id, text

    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(ask, jobs))
    return {"prompts": len(done), "train": done[:plan.train_prompts]}  # (prompt id, text), train first


def label(demo: Demo, plan: Plan) -> dict[str, Any]:
    """The labelers work the Feedback queue side by side (each task: K = 4 fresh samples)."""
    share = plan.tasks // len(LABELERS)

    def work(labeler: tuple[str, str, int]) -> Any:
        name, group, seed = labeler
        metadata = (("authorization", f"Bearer {demo.keys[name]}"),)
        with grpc.insecure_channel(demo.target) as channel:
            stub = feedback_pb2_grpc.FeedbackStub(channel)
            return SimulatedLabeler(p=NOISE_P, seed=seed, labeler_group=group, metadata=metadata).run(
                stub, share, k=4, timeout=300)

    with ThreadPoolExecutor(len(LABELERS)) as pool:
        reports = list(pool.map(work, LABELERS))
    return {"rankings": sum(r.submitted for r in reports), "pairs": sum(r.comparisons for r in reports)}


def demonstration_for(prompt: str) -> str:
    """What the demonstrator writes: on topic, polite, about 20 words, no digits."""
    topic = " ".join(sorted(content_words(prompt))[:3]) or "this"
    return (f"Thanks for asking about {topic}. I am glad to help: here is a short, clear and friendly answer, "
            "and I hope it helps you.")


def demonstrate(demo: Demo, prompts: list[tuple[str, str]]) -> int:
    """Demonstrations for logged train prompts (the SFT data), by a group-A labeler."""
    metadata = (("authorization", f"Bearer {demo.keys['lab-a1']}"),)
    with grpc.insecure_channel(demo.target) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)
        for prompt_id, text in prompts:
            stub.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
                request_id=uuid.uuid4().hex, prompt_id=prompt_id, response=demonstration_for(text)),
                metadata=metadata, timeout=60)
    return len(prompts)


def run_cycle(admin: RlhfClient, n: int, server: Process) -> admin_pb2.Cycle:
    """Trigger a cycle and follow its stages until it finishes."""
    cycle_id = admin.trigger_cycle(reason=f"demo cycle {n}", request_id=f"demo-{uuid.uuid4().hex}").cycle_id
    stage = None
    while (cycle := admin.get_cycle(cycle_id)).state not in FINISHED:
        server.check()
        if cycle.stage != stage:
            stage = cycle.stage
            print(f"  cycle {cycle_id}: {stage or 'queued'}", flush=True)
        time.sleep(1.0)
    return cycle


def serving_version(admin: RlhfClient) -> int:
    return admin.get_stats().serving_version


def measure_hidden_rule(demo: Demo, plan: Plan) -> list[float]:
    """The hidden rule's score of the serving policy's greedy answers to the fixed test prompts."""
    user = demo.users["test"][0]

    def score(text: str) -> float:
        with RlhfClient(demo.target, demo.keys[user]) as client:
            reply = client.generate(text, max_new_tokens=plan.max_new_tokens, temperature=0.0, timeout=300)
        return concise_polite(text, reply.completions[0].text)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(score, demo.test_set))


# ---------------------------------------------------------------------------- results


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(n: int, cycle: admin_pb2.Cycle, version: int, scores: dict[int, list[float]], traffic: dict,
              labels: dict, demos: int, seconds: float) -> dict[str, Any]:
    m = json.loads(cycle.metrics_json or "{}")
    rm, judge, ev = m.get("rm", {}).get("rm", {}), m.get("rm", {}).get("judge", {}), m.get("evaluate", {})
    by_group = rm.get("val", {}).get("by_group", {})
    return {
        "cycle": n, "id": cycle.cycle_id, "state": FINISHED[cycle.state], "serving": version,
        "candidate": cycle.candidate_version if cycle.HasField("candidate_version") else None,
        "prompts": traffic["prompts"], "rankings": labels["rankings"], "demos": demos,
        "sft": m.get("sft", {}).get("ran"), "rm_acc": rm.get("val", {}).get("accuracy"),
        "rm_acc_A": by_group.get("A", {}).get("accuracy"), "rm_acc_B": by_group.get("B", {}).get("accuracy"),
        "judge_acc": judge.get("val", {}).get("accuracy"), "win_rate": ev.get("judge_win_rate"),
        "p_value": ev.get("p_value"), "kl": ev.get("kl_to_sft"), "ptx_reg": ev.get("ptx_regression"),
        "hidden": mean(scores[version]), "error": cycle.error,
        "stage_seconds": {k: v.get("seconds") for k, v in m.items()}, "seconds": seconds,
    }


COLUMNS = [("cycle", "{:>5}"), ("state", "{:<8}"), ("serving", "{:>7}"), ("prompts", "{:>7}"),
           ("rankings", "{:>8}"), ("rm_acc", "{:>6}"), ("rm_acc_A", "{:>8}"), ("rm_acc_B", "{:>8}"),
           ("win_rate", "{:>8}"), ("p_value", "{:>7}"), ("kl", "{:>6}"), ("ptx_reg", "{:>7}"),
           ("hidden", "{:>6}"), ("seconds", "{:>7}")]


def print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print("  ".join(f"{name:>{len(fmt.format(''))}}" for name, fmt in COLUMNS))
    print("  ".join(fmt.format(_cell(row[name])) for name, fmt in COLUMNS), flush=True)
    if row["error"]:
        print(f"       ({row['error']})")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def sign_test(candidate: list[float], baseline: list[float]) -> dict[str, Any]:
    """One-sided sign test: does the final policy beat v0 on the same test prompts?"""
    from trainer.evaluate import binomial_sf_one_sided

    wins = sum(c > b for c, b in zip(candidate, baseline))
    losses = sum(c < b for c, b in zip(candidate, baseline))
    return {"wins": wins, "losses": losses, "ties": len(baseline) - wins - losses,
            "p_value": binomial_sf_one_sided(wins, wins + losses),
            "mean_final": mean(candidate), "mean_v0": mean(baseline)}


def report(demo: Demo, scores: dict[int, list[float]], test: dict[str, Any], seconds: float) -> None:
    """Significance, the plot and summary.json."""
    print(f"\nfinal v{max(scores)} vs v0 on {len(scores[0])} held-out test prompts (hidden rule, greedy): "
          f"{test['mean_final']:.3f} vs {test['mean_v0']:.3f}; wins {test['wins']}, losses {test['losses']}, "
          f"ties {test['ties']}; one-sided sign test p = {test['p_value']:.4f}")
    plot(demo.rows, scores, demo.out / "cycles.png")
    summary = {"rows": demo.rows, "hidden_rule_scores": scores, "sign_test": test, "seconds": seconds}
    (demo.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"total {seconds / 60:.1f} min; plot {demo.out / 'cycles.png'}; details {demo.out / 'summary.json'}")


def plot(rows: list[dict[str, Any]], scores: dict[int, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = [0] + [r["cycle"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(cycles, [mean(scores[0])] + [r["hidden"] for r in rows], "o-")
    axes[0].set(title="hidden-rule score of the serving policy", xlabel="cycle", ylabel="mean score (test prompts)")
    for key, label in (("rm_acc_A", "RM, group A"), ("rm_acc_B", "RM, group B"), ("judge_acc", "judge")):
        axes[1].plot([r["cycle"] for r in rows], [r[key] for r in rows], "o-", label=label)
    axes[1].axhline(1 - NOISE_P, ls="--", c="grey", label=f"ceiling 1 - p = {1 - NOISE_P:.2f}")
    axes[1].set(title="reward-model accuracy (held-out rankings)", xlabel="cycle", ylim=(0.3, 1.0))
    axes[1].legend()
    axes[2].bar([r["cycle"] for r in rows], [r["win_rate"] or 0 for r in rows])
    axes[2].axhline(0.5, ls="--", c="grey")
    axes[2].set(title="judge win rate vs serving (gate)", xlabel="cycle", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
