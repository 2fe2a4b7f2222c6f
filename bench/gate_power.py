"""Can the gate's judge tell a better policy from a worse one? Its verdict on a finished demo run.

The gate (trainer/gate.py) promotes a candidate when a judge, a reward model trained apart
from PPO's, prefers the candidate's greedy answers to the serving policy's on
``cycle.eval.max_prompts`` val prompts (16 in the demo). This bench replays that verdict
after the fact, on a run folder of ``scripts/demo.py``:

- it trains the two judges a cycle can train (``trainer.cycle.judge_split``: "val", the
  val split's rankings of the other prompts, data PPO's RM never saw; "held_in", those and
  the train split's) and PPO's RM, from the run's final store, on the demo's trainer config
  and the SFT reference given; none trains on the gate's evaluation prompts' rankings;
- it scores the greedy answers that ``scripts/demo.py`` kept for every version on the 64
  test prompts (``summary.json``; never ranked, never trained on, never evaluated by the gate);
- it compares each pair of versions asked for by each scorer and by the demo's noise-free
  rule (``concise_polite``), on all 64 prompts: the win rates, the scorer's agreement with
  the rule prompt by prompt (``prompt_agreement``), how often a gate of n prompts (n = 8,
  16, 32; random subsets of the 64) would have said "better" (win rate above 0.5, ties
  half, as the gate decides), and how often that call is the one the rule makes on all 64
  (``right_calls``).

The scorers train on the whole run's rankings (a later cycle's judge), and the kept answers
carry no finish reasons, so each is scored as finished.

    python -m bench.gate_power runs/demo-20261205-051512 --reference 1 --pairs 3:2 2:1 2:0 3:0
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

from bench.ppo_effect import DEMO_TOML, duel

GATE_SIZES = (8, 16, 32)
SCORERS = ("judge", "rm", "held_in")  # the val-split judge, PPO's RM, the held-in judge
SUBSETS = 2000  # random prompt subsets per gate size


def gate_says_better(new: Sequence[float], old: Sequence[float], size: int, rng: random.Random) -> float:
    """The share of random ``size``-prompt subsets on which ``new`` wins more than half (ties half)."""
    outcomes = [duel(a, b) for a, b in zip(new, old)]
    passed = 0
    for _ in range(SUBSETS):
        picked = rng.sample(outcomes, size)
        passed += sum(picked) / size > 0.5
    return passed / SUBSETS


def prompt_agreement(new: Sequence[float], old: Sequence[float], rule_new: Sequence[float],
                     rule_old: Sequence[float]) -> tuple[float, int]:
    """(agreements, prompts counted): on every prompt where the rule strictly prefers one of the
    two answers, 1 when the scorer prefers the same one, 0.5 when it ties them, else 0. Pooled
    over a run's pairs this is the scorer's accuracy on the very decisions a gate makes (two
    policies' answers to one prompt), with hundreds of prompts behind it instead of a few pairs."""
    agree, counted = 0.0, 0
    for a, b, ra, rb in zip(new, old, rule_new, rule_old):
        if ra == rb:
            continue
        counted += 1
        agree += 0.5 if a == b else float((a > b) == (ra > rb))
    return agree, counted


def train_scorers(run_dir: Path, reference: int, work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The two judges a cycle can train (``trainer.cycle.judge_split``: "val" and "held_in")
    and PPO's RM, from the run's final store, on the demo's recipe."""
    from common.store import Store
    from trainer.cycle import judge_split, rm_split
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
    splits = {"judge": judge_split(data, cfg.data.judge_eval_comparisons, "val"),
              "rm": rm_split(data),
              "held_in": judge_split(data, cfg.data.judge_eval_comparisons, "held_in")}
    sizes: dict[str, Any] = {}
    for name, (train, unseen) in splits.items():
        result = train_reward_model(reference_dir, train, unseen, cfg.rm, work / name, demonstrations=demos)
        sizes[f"{name}_rankings"] = len(train)
        sizes[f"{name}_accuracy"] = result.to_dict().get("val", {}).get("accuracy")
    return {name: work / name for name in SCORERS}, sizes


def right_calls(results: dict[str, Any], scorer: str, size: int) -> float | None:
    """How often an n-prompt gate with ``scorer`` makes the call the rule makes on all the
    prompts (better when the rule's win rate is above 0.5, not better below), averaged over
    the pairs; pairs the rule ties are left out."""
    calls = [row[scorer]["gate_says_better"][size] if row["rule"]["win_rate"] > 0.5
             else 1.0 - row[scorer]["gate_says_better"][size]
             for row in results["pairs"].values() if row["rule"]["win_rate"] != 0.5]
    return sum(calls) / len(calls) if calls else None


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
        folders, sizes = train_scorers(run_dir, reference, Path(tmp))
        results.update(sizes)
        scores: dict[str, dict[str, list[float]]] = {"rule": {v: [concise_polite(p, a) for p, a in zip(prompts, texts)]
                                                              for v, texts in answers.items()}}
        for name, folder in folders.items():
            model = RewardModel.load(folder)
            scores[name] = {v: model.score_texts(model.tokenizer, messages, texts).tolist()
                            for v, texts in answers.items()}
    for new, old in pairs:
        row = {}
        for name, by_version in scores.items():
            a, b = by_version[str(new)], by_version[str(old)]
            row[name] = {"win_rate": win_rate(torch.tensor(a), torch.tensor(b)),
                         "gate_says_better": {n: gate_says_better(a, b, n, rng) for n in GATE_SIZES if n <= len(a)},
                         "agreement": prompt_agreement(a, b, scores["rule"][str(new)], scores["rule"][str(old)])}
        results["pairs"][f"v{new} vs v{old}"] = row
    results["agreement"] = {}
    for name in SCORERS:
        agree = sum(row[name]["agreement"][0] for row in results["pairs"].values())
        counted = sum(row[name]["agreement"][1] for row in results["pairs"].values())
        results["agreement"][name] = [agree, counted]
    return results


def markdown(results: dict[str, Any]) -> str:
    sizes = [n for n in GATE_SIZES if n <= results["prompts"]]
    lines = [f"| pair | rule win (all {results['prompts']}) | val judge win | PPO's RM win | held-in judge win "
             "| prompts the rule decides: val judge / RM / held-in judge agree |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for pair, row in results["pairs"].items():
        agree = " / ".join(f"{row[s]['agreement'][0]:g}" for s in SCORERS)
        lines.append(f"| {pair} | {row['rule']['win_rate']:.3f} | {row['judge']['win_rate']:.3f} | "
                     f"{row['rm']['win_rate']:.3f} | {row['held_in']['win_rate']:.3f} | "
                     f"{row['rule']['agreement'][1]}: {agree} |")
    pooled = ", ".join(f"{s} {a / n:.3f} ({a:g} of {n})" if n else f"{s} -"
                       for s, (a, n) in results["agreement"].items())
    lines += [f"\nAgreement with the rule on the prompts it decides, all pairs: {pooled}\n",
              "| scorer | " + " | ".join(f"right calls, {n}-prompt gate" for n in sizes) + " |",
              "| --- | " + " | ".join("---:" for _ in sizes) + " |"]
    for scorer in ("rule", *SCORERS):
        calls = [right_calls(results, scorer, n) for n in sizes]
        lines.append(f"| {scorer} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in calls) + " |")
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
    print(f"val judge: {results['judge_rankings']} rankings, accuracy {results['judge_accuracy']:.3f} on unseen ones; "
          f"PPO's RM: {results['rm_rankings']} rankings, {results['rm_accuracy']:.3f}; "
          f"held-in judge: {results['held_in_rankings']} rankings, {results['held_in_accuracy']:.3f}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
