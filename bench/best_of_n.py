"""What the loop's reward model is worth to a policy at best: best-of-n by the RM, judged by
the noise-free rule (issue 12: is the policy goal out of the RM's reach, or out of PPO's?).

PPO is one way to turn an RM into a better policy. Best-of-n is the reference Gao et al.
(2022, "Scaling laws for reward model overoptimization", §2) measure optimisers against:
draw n answers from the policy and keep the one the RM scores highest. It needs no training,
so it shows what the RM's ranking is worth with no optimiser's error in the way, and its KL
to the sampling policy is known: at most log n - (n - 1) / n nats per answer (the same
paper). If best-of-8 by the loop's RM does not win 70% of the prompts by the rule against a
plain sample, the issue's 70% asks more of the RM than it knows; if it does and PPO does
not, the optimiser is what falls short.

Data: ``bench.reward_curve``'s (the embedded model's own samples, K = 9 per prompt at
temperature 1, cut to the demo's 64 labeling tokens; four noisy training labelers, p = 0.16;
64 test prompts that train nothing). For each training size the RM is the demo's recipe
(``scripts/demo_trainer.toml``'s ``[cycle.rm]``) on the first N pairwise comparisons.
On every test prompt, best-of-n is computed EXACTLY over its nine samples: every n-subset
picks its RM-best, which meets every sample outside the subset (an independent draw of the
same policy) by the rule, ties half (``best_of_n_win``). Beside each RM: the rule picking
(a perfect RM; the ceiling) and a picker at random (0.5, the check).

``--distil``: can a policy LEARN the picks within a cycle's means? Best-of-n costs n samples
per served answer; one round of rejection-sampling fine-tuning (Llama 2's) makes it the
policy's own. The RM on the first 2,000 pairs (about the demo's first cycle) picks the best
of nine on each of the next ``DISTIL_PROMPTS`` pool prompts (prompts it did not train on),
the demo's ``[cycle.sft]`` trains v0 on the picks, and its greedy answers, and two sampled at
the served temperature, meet v0's by the rule on every prompt that trained nothing. The
same with the rule picking (the ceiling) and with a random pick (fine-tuning on the model's
own samples with no selection: the control).

    python -m bench.best_of_n [--rule NAME] [--sizes 500 2000 4000 8000] [--json FILE]
    python -m bench.best_of_n --distil [--rule NAME] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import report

SIZES = (500, 2000, 4000, 8000)  # the demo's cycles train on about 2,000 (cycle 1) to 4,000 (cycle 3)
NS = (1, 2, 4, 8)  # 8: the most a prompt's nine samples allow with one left to meet
DISTIL_PAIRS = 2000  # the distilling RM's training pairs: about the demo's first cycle
DISTIL_PROMPTS = 96  # pool prompts whose picks train the SFT model
DISTIL_VAL = 16  # and the picks that choose its epoch (validation loss)


def pick(picker: Sequence[float], indexes: Sequence[int]) -> int:
    """The index among ``indexes`` that ``picker`` scores highest (the first on a tie)."""
    return max(indexes, key=lambda i: (picker[i], -i))


def best_of_n_win(picker: Sequence[float], truth: Sequence[float], n: int) -> float:
    """How often the ``picker``'s best of n samples beats one more sample by ``truth``, ties half.

    Exact over one prompt's K samples: every n-subset (its pick: the highest ``picker`` score,
    the first on a tie) against every sample outside it; needs 1 <= n < K.
    """
    from bench.ppo_effect import duel

    k = len(truth)
    if len(picker) != k:
        raise ValueError(f"{len(picker)} picker scores for {k} samples")
    if not 1 <= n < k:
        raise ValueError(f"best of {n} needs 1 <= n < {k} (one sample left to meet)")
    total, meetings = 0.0, 0
    for subset in itertools.combinations(range(k), n):
        best = pick(picker, subset)
        for other in set(range(k)) - set(subset):
            total += duel(truth[best], truth[other])
            meetings += 1
    return total / meetings


def best_of_n_kl(n: int) -> float:
    """Best-of-n's KL to the sampling policy, nats per answer (an upper bound; exact without ties)."""
    return math.log(n) - (n - 1) / n


def pickers_figures(pickers: dict[str, list[list[float]]], truth: list[list[float]],
                    ns: Sequence[int] = NS) -> dict[str, dict[int, tuple[float, float]]]:
    """Each picker's best-of-n win by ``truth`` (per prompt: ``picker[i]``, ``truth[i]``), with its error."""
    from bench.ppo_effect import mean_and_error

    return {name: {n: mean_and_error([best_of_n_win(p, t, n) for p, t in zip(scores, truth)]) for n in ns}
            for name, scores in pickers.items()}


def bench_samples(rule: str) -> tuple[Path, Any, Any, Any, Any]:
    """``bench.reward_curve``'s samples at the demo's labeling length, ranked under ``rule``:
    (model folder, tokenizer, samples, split, the rule's score)."""
    from bench.policy_samples import load_or_sample
    from bench.ppo_effect import LABEL_TOKENS
    from bench.reward_curve import K, comparisons_for
    from clients.prompts import load_prompts
    from clients.simulated_labeler import rule_from_name
    from common.models import ensure_embedded_model, load_tokenizer

    model_dir = ensure_embedded_model()
    tokenizer = load_tokenizer(model_dir)
    full = load_or_sample(model_dir, [p.text for p in load_prompts()], k=K, max_tokens=128)
    samples = full.truncated(LABEL_TOKENS, tokenizer)
    return model_dir, tokenizer, samples, comparisons_for(samples, rule=rule), rule_from_name(rule)


def rm_scores(rm_dir: Path, tokenizer: Any, rows: Sequence[Any]) -> list[list[float]]:
    """The saved RM's score of every sample of every row (``rows[i].texts``), row by row."""
    from trainer.examples import user_turn
    from trainer.reward_model import RewardModel

    flat = RewardModel.load(rm_dir).score_texts(
        tokenizer, [user_turn(row.prompt) for row in rows for _ in row.texts], [t for row in rows for t in row.texts],
        stopped=[s for row in rows for s in row.stopped]).tolist()
    out, start = [], 0
    for row in rows:
        out.append(flat[start:start + len(row.texts)])
        start += len(row.texts)
    return out


def run(rule: str = "concise_polite", sizes: Sequence[int] = SIZES) -> dict[str, Any]:
    import random

    import torch

    from bench.ppo_effect import LABEL_TOKENS, demo_configs
    from bench.reward_curve import K, cached_trunk, first_pairs, ordered_pairs
    from trainer.rm_training import train_reward_model

    torch.manual_seed(0)
    model_dir, tokenizer, samples, split, score = bench_samples(rule)
    rows = [samples.rows[int(c.prompt_id)] for c in split.test_rule]
    truth = [[score(row.prompt, t) for t in row.texts] for row in rows]
    coin = random.Random(0)
    pickers: dict[str, list[list[float]]] = {
        "the rule itself (a perfect RM)": truth,
        "at random (the check: 0.5)": [[coin.random() for _ in row.texts] for row in rows]}
    rms: dict[str, dict[str, Any]] = {}
    cache = cached_trunk("pooled head", samples.model_fingerprint)  # bench.reward_curve's kept trunk states
    rm_config = demo_configs().rm
    with tempfile.TemporaryDirectory() as tmp:
        trained = 0
        for size in sizes:
            train = first_pairs(split.train, size)
            if len(train) == trained:  # the pool ran out (a rule that ties much leaves fewer pairs)
                continue
            trained = len(train)
            started = time.perf_counter()
            out = Path(tmp) / f"rm-{size}"
            result = train_reward_model(model_dir, train, split.test_rule + split.test_held_out, rm_config, out,
                                        trunk_cache=cache)
            name = f"the RM on {ordered_pairs(train):,} pairs"
            pickers[name] = rm_scores(out, tokenizer, rows)
            groups = result.val["by_group"]
            rms[name] = {"pairs": ordered_pairs(train), "rankings": len(train), "rule": groups["rule"]["accuracy"],
                         "held_out": groups["held-out"]["accuracy"], "seconds": time.perf_counter() - started}
            print(f"{name}: pairwise rule {rms[name]['rule']:.3f} held-out {rms[name]['held_out']:.3f} "
                  f"({rms[name]['seconds']:.0f} s)", flush=True)
    figures = pickers_figures(pickers, truth)
    results = {"rule": rule, "test_prompts": len(rows), "k": K, "label_tokens": LABEL_TOKENS,
               "train_pool_pairs": ordered_pairs(split.train), "rms": rms,
               "best_of_n": {name: {str(n): {"win": w, "se": e} for n, (w, e) in by_n.items()}
                             for name, by_n in figures.items()}}
    results["markdown"] = markdown(results)
    return results


def distil(rule: str = "concise_polite") -> dict[str, Any]:
    """SFT of v0 on each picker's best of nine, and the result's answers against v0's by the rule."""
    import random

    import torch

    from bench.ppo_effect import (SAMPLED_ANSWERS, demo_configs, greedy_answers, rule_win_and_error,
                                  rule_win_over_samples, sampled_answers)
    from bench.reward_curve import K, cached_trunk, first_pairs, ordered_pairs
    from trainer.examples import Demonstration, user_turn
    from trainer.rm_training import train_reward_model
    from trainer.sft import train_sft

    torch.manual_seed(0)
    model_dir, tokenizer, samples, split, score = bench_samples(rule)
    cycle = demo_configs()
    rm_train = first_pairs(split.train, DISTIL_PAIRS)
    rest = split.train[len(rm_train):]
    picked_rows = [samples.rows[int(c.prompt_id)] for c in rest[:DISTIL_PROMPTS + DISTIL_VAL]]
    unseen = [samples.rows[int(c.prompt_id)].prompt for c in split.test_rule + rest[DISTIL_PROMPTS + DISTIL_VAL:]]
    results: dict[str, Any] = {"rule": rule, "rm_pairs": ordered_pairs(rm_train), "sft_prompts": DISTIL_PROMPTS,
                               "val_prompts": DISTIL_VAL, "unseen_prompts": len(unseen), "pickers": {}}
    max_new, served_t = cycle.eval.max_new_tokens, cycle.ppo.temperature
    start_greedy = greedy_answers(model_dir, unseen, max_new)
    start_sampled = sampled_answers(model_dir, unseen, max_new, served_t, SAMPLED_ANSWERS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rm_result = train_reward_model(model_dir, rm_train, split.test_rule + split.test_held_out, cycle.rm,
                                       work / "rm", trunk_cache=cached_trunk("pooled head", samples.model_fingerprint))
        groups = rm_result.val["by_group"]
        results["rm"] = {"rule": groups["rule"]["accuracy"], "held_out": groups["held-out"]["accuracy"]}
        coin = random.Random(0)
        pickers = {f"the RM on {results['rm_pairs']:,} pairs": rm_scores(work / "rm", tokenizer, picked_rows),
                   "the rule itself (a perfect RM)": [[score(row.prompt, t) for t in row.texts] for row in picked_rows],
                   "at random (no selection)": [[coin.random() for _ in row.texts] for row in picked_rows]}
        for name, picker in pickers.items():
            started = time.perf_counter()
            chosen = [pick(p, range(K)) for p in picker]
            picks = [Demonstration(user_turn(row.prompt), row.texts[j], str(i))
                     for i, (row, j) in enumerate(zip(picked_rows, chosen))]
            out = work / f"sft-{len(results['pickers'])}"
            train_sft(model_dir, picks[:DISTIL_PROMPTS], picks[DISTIL_PROMPTS:], cycle.sft, out)
            greedy = greedy_answers(out, unseen, max_new)
            sampled = sampled_answers(out, unseen, max_new, served_t, SAMPLED_ANSWERS)
            win, se = rule_win_and_error(score, unseen, greedy, start_greedy)
            win_sampled, se_sampled = rule_win_over_samples(score, unseen, sampled, start_sampled)
            results["pickers"][name] = {
                "picks_rule_mean": statistics.fmean(score(row.prompt, row.texts[j])
                                                    for row, j in zip(picked_rows, chosen)),
                "greedy_win": win, "greedy_se": se, "sampled_win": win_sampled, "sampled_se": se_sampled,
                "changed": statistics.fmean(a != b for a, b in zip(greedy, start_greedy)),
                "seconds": time.perf_counter() - started}
            print(f"{name}: greedy {win:.3f} ± {se:.3f}, sampled {win_sampled:.3f} ± {se_sampled:.3f} "
                  f"({results['pickers'][name]['seconds']:.0f} s)", flush=True)
    results["pool_rule_mean"] = statistics.fmean(score(row.prompt, t) for row in picked_rows for t in row.texts)
    results["markdown"] = distil_markdown(results)
    return results


def distil_markdown(results: dict[str, Any]) -> str:
    lines = [f"Labelers' rule `{results['rule']}`; SFT of v0 on one pick of nine on each of {results['sft_prompts']} "
             f"prompts ({results['val_prompts']} more choose the epoch); v0's answers met on "
             f"{results['unseen_prompts']} prompts that trained nothing, by the rule, ties half (± s.e.). The RM: "
             f"{results['rm']['rule']:.3f} / {results['rm']['held_out']:.3f} pairwise (rule / held-out); the "
             f"samples' rule mean {results['pool_rule_mean']:.3f}.", "",
             "| picker | the picks' rule mean | greedy answers vs v0 | 2 samples at the served temperature vs v0 | "
             "greedy answers changed | seconds |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in results["pickers"].items():
        lines.append(f"| {name} | {v['picks_rule_mean']:.3f} | {v['greedy_win']:.3f} ± {v['greedy_se']:.3f} | "
                     f"{v['sampled_win']:.3f} ± {v['sampled_se']:.3f} | {v['changed']:.2f} | {v['seconds']:.0f} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The results as docs/BENCHMARKS.md's table."""
    ns = [int(n) for n in next(iter(results["best_of_n"].values()))]
    header = " | ".join(f"best of {n} (KL <= {best_of_n_kl(n):.2f})" for n in ns)
    lines = [f"Labelers' rule `{results['rule']}`; {results['test_prompts']} test prompts x K = {results['k']} "
             f"samples of up to {results['label_tokens']} tokens; win by the rule against one more sample of the "
             "same policy, ties half (± s.e. over prompts).", "",
             f"| picker | pairwise accuracy (rule / held-out) | {header} |",
             "| --- | ---: | " + " | ".join("---:" for _ in ns) + " |"]
    for name, by_n in results["best_of_n"].items():
        rm = results["rms"].get(name)
        accuracy = f"{rm['rule']:.3f} / {rm['held_out']:.3f}" if rm else "-"
        cells = " | ".join(f"{by_n[str(n)]['win']:.3f} ± {by_n[str(n)]['se']:.3f}" for n in ns)
        lines.append(f"| {name} | {accuracy} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="concise_polite", help="the labelers' rule (clients.simulated_labeler)")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="the RMs' training pairs")
    parser.add_argument("--distil", action="store_true", help="SFT on each picker's best of nine, then its answers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = distil(args.rule) if args.distil else run(args.rule, args.sizes)
    report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
