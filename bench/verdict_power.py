"""The demo's verdict as a statistical test: its false-positive rate and its power.

``scripts/demo.py`` compares the final policy's answers with v0's on a fixed set of test
prompts; each held-out labeler judges every pair, following the hidden rule except with
probability p = 0.16 per pair (``clients.simulated_labeler.noisy_ranking``, as they label).
Two labelers judging the same pair of answers share that pair's truth, so their verdicts are
not independent samples. This bench simulates the verdict and counts how often each test
says p < alpha:

- ``prompt``: the demo's test since 2026-12-05, ``trainer.evaluate.sign_flip_p_value`` on
  each prompt's net preference (wins minus losses over the labelers);
- ``pooled``: the binomial test on all the labelers' strict preferences pooled, the demo's
  test until then.

With ``--rule-win 0.5`` (neither policy better: the rule prefers either answer of a decided
prompt as often) the rate is the test's false-positive rate, which must not exceed alpha;
above 0.5 it is the test's power, the chance that a policy that good passes the demo.

    python -m bench.verdict_power [--prompts 64 128] [--rule-win 0.5 0.6 0.65 0.7 0.75] [--trials 2000]
"""

from __future__ import annotations

import argparse
import random
from typing import Any, Sequence

from clients.simulated_labeler import NOISE_P, noisy_ranking

ALPHA = 0.01  # scripts/demo.py's
HELD_OUT_LABELERS = 2  # the demo's group B
TIE_SHARE = 0.1  # prompts the rule ties (the labelers pass): about a tenth of the demo's test prompts
PROMPTS = (64, 128)
RULE_WINS = (0.5, 0.6, 0.65, 0.7, 0.75)
TRIALS = 2000


def simulate(prompts: int, rule_win: float, trials: int, seed: int = 0, labelers: int = HELD_OUT_LABELERS,
             noise: float = NOISE_P, tie_share: float = TIE_SHARE, alpha: float = ALPHA) -> dict[str, float]:
    """The share of ``trials`` simulated verdicts each test calls significant. ``rule_win``: how
    often the rule prefers the new policy's answer on a prompt it does not tie."""
    from trainer.evaluate import binomial_sf_one_sided, sign_flip_p_value

    rng = random.Random(seed)
    significant = {"prompt": 0, "pooled": 0}
    for _ in range(trials):
        net, wins, losses = [], 0, 0
        for _ in range(prompts):
            if rng.random() < tie_share:
                net.append(0)  # tied by the rule: every labeler passes
                continue
            pair = [1.0, 0.0] if rng.random() < rule_win else [0.0, 1.0]  # (new, old) rule scores
            this = 0
            for _ in range(labelers):
                won = noisy_ranking(pair, noise, rng)[0] == [0]
                this, wins, losses = this + (1 if won else -1), wins + won, losses + (not won)
            net.append(this)
        significant["prompt"] += sign_flip_p_value(net) < alpha
        significant["pooled"] += binomial_sf_one_sided(wins, wins + losses) < alpha
    return {name: count / trials for name, count in significant.items()}


def run(prompts: Sequence[int] = PROMPTS, rule_wins: Sequence[float] = RULE_WINS, trials: int = TRIALS) -> dict[str, Any]:
    rows = []
    for n in prompts:
        for w in rule_wins:
            rates = simulate(n, w, trials)
            rows.append({"prompts": n, "rule_win": w, **rates})
            print(f"{n:4d} prompts  rule win {w:.2f}  prompt-level {rates['prompt']:.3f}  pooled {rates['pooled']:.3f}",
                  flush=True)
    return {"rows": rows, "trials": trials, "markdown": markdown(rows, trials)}


def markdown(rows: Sequence[dict[str, Any]], trials: int) -> str:
    lines = [f"| test prompts | the rule's win on decided prompts | prompt-level test: share p < {ALPHA} | "
             f"pooled binomial test | ({trials} simulated verdicts each) |",
             "| ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        what = "false-positive rate" if r["rule_win"] == 0.5 else "power"
        lines.append(f"| {r['prompts']} | {r['rule_win']:.2f} | {r['prompt']:.3f} | {r['pooled']:.3f} | {what} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS))
    parser.add_argument("--rule-win", type=float, nargs="+", default=list(RULE_WINS))
    parser.add_argument("--trials", type=int, default=TRIALS)
    args = parser.parse_args(argv)
    print(run(args.prompts, args.rule_win, args.trials)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
