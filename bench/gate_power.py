"""Can the gate's judge tell a better policy from a worse one? Its verdict on a finished demo run.

The gate (trainer/gate.py) promotes a candidate when a judge, a reward model trained on
val-split rankings PPO never optimised against, prefers the candidate's greedy answers to
the serving policy's on ``cycle.eval.max_prompts`` prompts (8 in the demo). This bench
replays that verdict after the fact, on a run folder of ``scripts/demo.py``:

- it trains a judge the way a cycle does (``trainer.cycle.judge_split`` on the run's final
  store, the demo's trainer config, on the SFT reference given), and PPO's RM beside it;
- it scores the greedy answers that ``scripts/demo.py`` kept for every version on the 64
  test prompts (``summary.json``; never ranked, never trained on, never evaluated by the gate);
- it compares each pair of versions asked for by the judge, by PPO's RM and by the demo's
  noise-free rule (``concise_polite``), on all 64 prompts, and gives how often a gate of
  n prompts (n = 8, 16, 32; random subsets of the 64) would have said "better" (win rate
  above 0.5, ties half, as the gate decides).

If the judge on 64 prompts agrees with the rule and 8-prompt subsets do not, more evaluation
prompts would fix the gate; if the judge disagrees with the rule on all 64, the judge is the
problem. The judge here trains on the whole run's val rankings (a later cycle's judge), and
the kept answers carry no finish reasons, so each is scored as finished.

    python -m bench.gate_power runs/demo-20261205-051512 --reference 1 --pairs 3:2 2:1 2:0 3:0
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

from bench.ppo_effect import DEMO_TOML

GATE_SIZES = (8, 16, 32)
SUBSETS = 2000  # random prompt subsets per gate size


def gate_says_better(new: Sequence[float], old: Sequence[float], size: int, rng: random.Random) -> float:
    """The share of random ``size``-prompt subsets on which ``new`` wins more than half (ties half)."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(new, old)]
    passed = 0
    for _ in range(SUBSETS):
        picked = rng.sample(outcomes, size)
        passed += sum(picked) / size > 0.5
    return passed / SUBSETS


def train_judge_and_rm(run_dir: Path, reference: int, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A judge and PPO's RM as a cycle trains them, from the run's final store."""
    from common.store import Store
    from trainer.cycle import judge_split
    from trainer.hygiene import run_hygiene
    from trainer.loop_config import load_trainer_config
    from trainer.rm_training import train_reward_model
    from trainer.snapshot_data import prompt_records, read_rows, split_cycle_data

    cfg = load_trainer_config(DEMO_TOML).cycle
    with Store.open_readonly(run_dir / "data" / "rlhf.sqlite") as store:
        rows = store.read_sync(read_rows)
    kept, _ = run_hygiene(prompt_records(rows.prompts), cfg.hygiene)
    data = split_cycle_data(rows, kept, since=0.0, until=float("inf"), max_ppo_prompts=cfg.data.max_ppo_prompts,
                            ppo_sources=cfg.data.ppo_sources, eval_splits=cfg.data.eval_splits,
                            max_eval_prompts=cfg.eval.max_prompts, held_out_groups=cfg.data.held_out_groups)
    reference_dir = run_dir / "data" / "checkpoints" / f"v{reference}"
    demos = data.demonstrations["train"] or None
    judge_train, judge_unseen = judge_split(data, cfg.data.judge_eval_comparisons)
    judge = train_reward_model(reference_dir, judge_train, judge_unseen, cfg.rm, work / "judge", demonstrations=demos)
    rm = train_reward_model(reference_dir, data.comparisons["train"],
                            data.comparisons["val"] + data.held_out_comparisons, cfg.rm, work / "rm",
                            demonstrations=demos)
    sizes = {"judge_rankings": len(judge_train), "rm_rankings": len(data.comparisons["train"]),
             "judge_accuracy": judge.to_dict().get("val", {}).get("accuracy"),
             "rm_accuracy": rm.to_dict().get("val", {}).get("accuracy")}
    return work / "judge", work / "rm", sizes


def run(run_dir: Path, reference: int, pairs: Sequence[tuple[int, int]], seed: int = 0) -> dict[str, Any]:
    import torch

    from clients.simulated_labeler import concise_polite
    from trainer.evaluate import win_rate
    from trainer.examples import user_turn
    from trainer.reward_model import RewardModel

    summary = json.loads((run_dir / "summary.json").read_text())
    prompts, answers = summary["test_prompts"], summary["answers"]
    messages = [user_turn(p) for p in prompts]
    rng = random.Random(seed)
    results: dict[str, Any] = {"run": str(run_dir), "reference": reference, "prompts": len(prompts), "pairs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        judge_dir, rm_dir, sizes = train_judge_and_rm(run_dir, reference, Path(tmp))
        results.update(sizes)
        scores: dict[str, dict[str, list[float]]] = {"rule": {v: [concise_polite(p, a) for p, a in zip(prompts, texts)]
                                                              for v, texts in answers.items()}}
        for name, folder in (("judge", judge_dir), ("rm", rm_dir)):
            model = RewardModel.load(folder)
            scores[name] = {v: model.score_texts(model.tokenizer, messages, texts).tolist()
                            for v, texts in answers.items()}
    for new, old in pairs:
        row = {}
        for name, by_version in scores.items():
            a, b = by_version[str(new)], by_version[str(old)]
            row[name] = {"win_rate": win_rate(torch.tensor(a), torch.tensor(b)),
                         "gate_says_better": {n: gate_says_better(a, b, n, rng) for n in GATE_SIZES if n <= len(a)}}
        results["pairs"][f"v{new} vs v{old}"] = row
    return results


def markdown(results: dict[str, Any]) -> str:
    sizes = [n for n in GATE_SIZES if n <= results["prompts"]]
    head = " | ".join(f"judge says better on {n} prompts" for n in sizes)
    lines = [f"| pair | rule win (all {results['prompts']}) | judge win | PPO's RM win | {head} |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for pair, row in results["pairs"].items():
        gate = " | ".join(f"{row['judge']['gate_says_better'][n]:.2f}" for n in sizes)
        lines.append(f"| {pair} | {row['rule']['win_rate']:.3f} | {row['judge']['win_rate']:.3f} | "
                     f"{row['rm']['win_rate']:.3f} | {gate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a scripts/demo.py run folder (runs/demo-...)")
    parser.add_argument("--reference", type=int, required=True,
                        help="the SFT version the judge and RM start from (a cycle's reference)")
    parser.add_argument("--pairs", nargs="+", required=True, help="NEW:OLD version pairs, e.g. 3:2 2:0")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs]
    except ValueError:
        parser.error("--pairs takes NEW:OLD version numbers, e.g. 3:2")
    if any(len(p) != 2 for p in pairs):
        parser.error("--pairs takes NEW:OLD version numbers, e.g. 3:2")
    results = run(args.run_dir, args.reference, pairs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"judge: {results['judge_rankings']} rankings, accuracy {results['judge_accuracy']:.3f} on unseen ones; "
          f"PPO's RM: {results['rm_rankings']} rankings, {results['rm_accuracy']:.3f}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
