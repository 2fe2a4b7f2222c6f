"""The reward model's learning curve on the embedded model's OWN samples, ranked by simulated
labelers: the chooser of the RM recipe (issue 12).

Data. SmolLM2-135M answers every shipped prompt with K = 9 samples (temperature 1, up to
128 tokens; ``bench.policy_samples``, made once and kept on disk). 64 prompts are the
test set; the rest are ranked, one ranking per prompt, by four training labelers who
follow the hidden rule (``clients.simulated_labeler.concise_polite``) but are inattentive
with probability 2p (p = 0.16: each pair reversed with probability p, as the demo's
labelers). Each recipe trains on the first N pairwise comparisons (whole rankings) for N
in ``SIZES`` and is scored on the test prompts against

- the noise-free rule (``rule``): the truth no labeler reports; 1.0 is perfect;
- two held-out noisy labelers (``held-out``), who never trained anything: a model that
  learned the rule exactly agrees with them 1 - p = 0.84 of the time (the ceiling).

Recipes (``RMConfig``), all on the same frozen SFT trunk whose output is computed once
per completion (``trainer.trunk_cache``):

- ``pooled head``: the default: the whole trunk frozen, ``trainer.rm_heads.PooledHead`` on
  the token embeddings and layer 12's states (``RMConfig.pool_depths`` (0.0, 0.4)).
  Nothing above layer 12 is read, so the trunk runs 12 of its 30 layers
  (``RMConfig.head_last_state`` False);
- ``pooled head + final state``: the same head also reading the last token's final state
  (the whole trunk runs; the default until 2026-12-04 evening);
- ``pooled head, layer 12``: the head with the final state on layer 12's states alone (the
  default before 2026-12-04);
- ``last-token head``: the whole trunk frozen, the paper's linear head on the last token;
- ``pooled head + LoRA``: the default head with LoRA adapters on the cut trunk's 12 layers
  (``RMConfig.lora_r``), trained together, 2 epochs at 5e-4: the trunk runs forward and
  backward every epoch (nothing cached), so it costs minutes where the head costs seconds
  (run only when named in ``--recipes``);
- ``top-2 layers``: the top two decoder layers and the paper's head train (the previous
  default), 2 epochs at 3e-4.

Two more measurements with the default recipe: the labeling sample length (samples cut
to 64 and 96 tokens are exactly samples drawn with that cap), and K = 4 against K = 9 at
the same number of sampled completions (the sampling cost).

A recipe must not be chosen for one labeler's rule: ``--rule`` ranks the same samples by
another of ``clients.simulated_labeler.RULES`` (default: the demo's), and ``--cap`` cuts the
samples to the demo's labeling length first. ``--noise 0`` trains on the noise-free rule's
own rankings: the recipe's curve without the labelers' noise, which splits the gap to the
rule into what the noise costs and what the recipe (its features, its data) leaves.

    python -m bench.reward_curve [--sizes 250 500 1000 2000 4000 8000] [--quick] [--recipes NAME ...]
                                 [--rule NAME] [--cap TOKENS] [--noise P]
    python -m bench.reward_curve --trunk-cost   # the cut trunk's pass against the whole one's
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bench import report
from bench.policy_samples import SampleSet, load_or_sample
from clients.simulated_labeler import NOISE_P, RULES

SIZES = (250, 500, 1000, 2000, 4000, 8000)
K = 9
TEST_PROMPTS = 64
TRAIN_SEEDS = (1, 2, 5, 6)  # four training labelers, round robin over the prompts
HELD_OUT_SEEDS = (3, 4)  # two held-out labelers rank every test prompt
CAPS = (64, 96)  # labeling sample lengths measured beside the full 128
RECIPES: dict[str, dict[str, Any]] = {
    "pooled head": {},
    "pooled head, layer 12": {"pool_depths": [0.4], "head_last_state": True},
    "pooled head + final state": {"head_last_state": True},
    "last-token head": {"head": "last_token"},
    "pooled head + LoRA": {"train_mode": "lora", "epochs": 2, "learning_rate": 5e-4},
    "top-2 layers": {"train_mode": "top_layers", "top_layers": 2, "head": "last_token", "learning_rate": 3e-4,
                     "weight_decay": 0.0, "epochs": 2, "batch_size": 4},
}
ONLY_WHEN_NAMED = {"pooled head + LoRA"}  # minutes per point: run with --recipes, not in the full curve
PNG = Path(__file__).resolve().parent.parent / "docs" / "reward-curve.png"


@dataclass
class Split:
    """Comparisons for one sample length: the ranked training pool and the two test views."""

    train: list  # one Comparison per training prompt, in labeling order
    test_rule: list  # the test prompts ranked by the noise-free rule (group "rule")
    test_held_out: list  # ranked by each held-out labeler (group "held-out")
    tokens_per_sample: float


def comparisons_for(samples: SampleSet, seed: int = 0, rule: str = "concise_polite", noise: float = NOISE_P) -> Split:
    """Rank the samples: training pool by the training labelers (noise ``noise``), test prompts by
    the rule and the held-out labelers (always ``NOISE_P``), all following ``rule``
    (``clients.simulated_labeler.RULES``)."""
    from clients.simulated_labeler import groups_by_score, noisy_ranking, rule_from_name
    from trainer.examples import Comparison, user_turn

    score = rule_from_name(rule)

    order = list(range(len(samples.rows)))
    random.Random(seed).shuffle(order)
    test, pool = order[:TEST_PROMPTS], order[TEST_PROMPTS:]
    labelers = [random.Random(s) for s in TRAIN_SEEDS]
    held_out = [random.Random(s) for s in HELD_OUT_SEEDS]

    def comparison(i: int, groups: list[list[int]], group: str) -> Comparison:
        row = samples.rows[i]
        ranks = tuple(next(r for r, g in enumerate(groups) if j in g) for j in range(len(row.texts)))
        return Comparison(user_turn(row.prompt), tuple(row.texts), ranks, labeler_group=group,
                          stopped=tuple(row.stopped), prompt_id=str(i))

    def scores(i: int) -> list[float]:
        return [score(samples.rows[i].prompt, t) for t in samples.rows[i].texts]

    train = [comparison(i, noisy_ranking(scores(i), noise, labelers[n % len(labelers)]), "A")
             for n, i in enumerate(pool)]
    test_rule = [comparison(i, groups_by_score(scores(i)), "rule") for i in test]
    test_held_out = [comparison(i, noisy_ranking(scores(i), NOISE_P, rng), "held-out") for rng in held_out for i in test]
    return Split([c for c in train if len(set(c.ranks)) > 1], test_rule, test_held_out,
                 samples.tokens / (len(samples.rows) * samples.k))


def ordered_pairs(comparisons: Sequence) -> int:
    """The pairwise comparisons (pairs of different rank) the rankings hold."""
    return sum(sum(1 for a in c.ranks for b in c.ranks if a < b) for c in comparisons)


def first_pairs(comparisons: Sequence, n: int) -> list:
    """Whole rankings from the start until they hold at least ``n`` ordered pairs."""
    out, pairs = [], 0
    for c in comparisons:
        if pairs >= n:
            break
        out.append(c)
        pairs += ordered_pairs([c])
    return out


def first_k(comparisons: Sequence, k: int) -> list:
    """Each ranking cut to its first ``k`` completions (a labeling task with K = k)."""
    from trainer.examples import Comparison

    out = []
    for c in comparisons:
        ranks = c.ranks[:k]
        if len(set(ranks)) > 1:
            out.append(Comparison(c.messages, c.completions[:k], ranks, labeler_group=c.labeler_group,
                                  stopped=c.stopped[:k], prompt_id=c.prompt_id))
    return out


def train_and_score(model_dir: Path, train: list, split: Split, overrides: dict[str, Any], cache: Any,
                    work: Path) -> dict[str, Any]:
    """One recipe on one training set: accuracy on the test views, pairs, seconds."""
    from trainer.config import RMConfig
    from trainer.rm_training import train_reward_model

    config = RMConfig(**{"show_progress": False, "max_response_length": 256, **overrides})
    started = time.perf_counter()
    result = train_reward_model(model_dir, train, split.test_rule + split.test_held_out, config, work / "rm",
                                trunk_cache=cache)
    groups = result.val["by_group"]
    return {"rule": groups["rule"]["accuracy"], "held_out": groups["held-out"]["accuracy"],
            "rankings": len(train), "pairs": ordered_pairs(train),
            "train_seconds": sum(e["seconds"] for e in result.epochs), "seconds": time.perf_counter() - started,
            "trunk_computed": result.trunk_computed}


def cached_trunk(name: str, fingerprint: str) -> Any:
    """A ``TrunkCache`` for one recipe, filled from ``$RLHF_DATA_DIR/bench/`` when an earlier run
    kept it (the frozen trunk's states are the slow part: minutes per recipe on a CPU)."""
    import torch

    from common import paths
    from trainer.trunk_cache import TrunkCache

    cache = TrunkCache(max_mb=8192)
    cache.file = paths.data_dir() / "bench" / f"trunk-{fingerprint[:12]}-{name.replace(' ', '-')}.pt"
    if cache.file.exists():
        saved = torch.load(cache.file, weights_only=False)
        cache.key = saved["key"]
        for row, states in saved["rows"].items():
            cache._put(row, states)
    return cache


def keep_trunk(cache: Any) -> None:
    import torch

    tmp = cache.file.with_suffix(".tmp")
    torch.save({"key": cache.key, "rows": dict(cache._rows)}, tmp)
    tmp.replace(cache.file)


def run(sizes: Sequence[int] = SIZES, quick: bool = False, recipes: Sequence[str] | None = None,
        rule: str = "concise_polite", cap: int | None = None, noise: float = NOISE_P) -> dict[str, Any]:
    """The curve of each recipe in ``recipes`` (default: all; ``quick``: the default recipe
    only, without the sample-length and K tables), the labelers following ``rule``, the
    curves' samples cut to ``cap`` tokens when given, the training labelers inattentive with
    ``noise`` (0: the noise-free rule's rankings, what no labeler gives: how much of the
    curve's gap to the rule is the labels' noise and how much the recipe's)."""
    import torch

    from clients.prompts import load_prompts
    from common.models import ensure_embedded_model, load_tokenizer
    if (cap is not None or noise != NOISE_P) and not quick:  # the other tables compare against the defaults
        raise ValueError("cap and noise change the curves only: use them with quick")
    torch.manual_seed(0)
    model_dir = ensure_embedded_model()
    tokenizer = load_tokenizer(model_dir)
    texts = [p.text for p in load_prompts()]
    full = load_or_sample(model_dir, texts, k=K, max_tokens=128)
    results: dict[str, Any] = {"sampling": {"prompts": len(full.rows), "k": full.k, "max_tokens": full.max_tokens,
                                            "tokens": full.tokens, "seconds": full.seconds},
                               "curve": {}, "caps": {}, "k4_vs_k9": {}, "rule": rule, "cap": cap,
                               "noise": noise}
    names = recipes or (["pooled head"] if quick else [name for name in RECIPES if name not in ONLY_WHEN_NAMED])
    recipes = {name: RECIPES[name] for name in names}
    caches = {name: cached_trunk(name, full.model_fingerprint) for name in recipes}  # one frozen trunk each
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        split = comparisons_for(full if cap is None else full.truncated(cap, tokenizer), rule=rule, noise=noise)
        results["train_pool_pairs"] = ordered_pairs(split.train)
        for name, overrides in recipes.items():
            for n in sizes:
                point = train_and_score(model_dir, first_pairs(split.train, n), split, overrides, caches[name], work)
                results["curve"].setdefault(name, {})[n] = point
                print(f"{name:16s} {n:5d} pairs: rule {point['rule']:.3f} held-out {point['held_out']:.3f} "
                      f"({point['seconds']:.0f} s)", flush=True)
            keep_trunk(caches[name])
        default = caches.get("pooled head") or cached_trunk("pooled head", full.model_fingerprint)
        # The sample length: the same samples cut shorter, the default recipe.
        for shorter in () if quick else CAPS:
            cut = comparisons_for(full.truncated(shorter, tokenizer), rule=rule)
            for n in (2000, 4000):
                point = train_and_score(model_dir, first_pairs(cut.train, n), cut, {}, default, work)
                point["tokens_per_sample"] = cut.tokens_per_sample
                results["caps"].setdefault(shorter, {})[n] = point
                print(f"cap {shorter}: {n} pairs: rule {point['rule']:.3f} held-out {point['held_out']:.3f}", flush=True)
            keep_trunk(default)
        # K = 4 against K = 9 for the same sampled completions (what sampling costs).
        for samples in () if quick else (504, 1008):
            for k in (4, 9):
                train = first_k(split.train, k)[:samples // k]
                point = train_and_score(model_dir, train, split, {}, default, work)
                point["samples"] = len(train) * k
                results["k4_vs_k9"].setdefault(samples, {})[k] = point
                print(f"{samples} samples as K = {k}: rule {point['rule']:.3f} held-out {point['held_out']:.3f}",
                      flush=True)
    results["cap128"] = {n: results["curve"].get("pooled head", {}).get(n) for n in (2000, 4000)}
    results["tokens_per_sample_128"] = comparisons_for(full, rule=rule).tokens_per_sample
    results["markdown"] = markdown(results)
    if not quick:  # the PNG in docs/BENCHMARKS.md shows the full run's curves
        plot(results, PNG)
    return results


def markdown(r: dict[str, Any]) -> str:
    s = r["sampling"]
    lines = [
        f"The embedded model's own samples: {s['prompts']} prompts x K = {s['k']}, temperature 1, up to "
        f"{s['max_tokens']} tokens ({s['tokens']} tokens, sampled once by offline vLLM in {s['seconds']:.0f} s and "
        f"kept under `data/bench/`); 64 test prompts, the rest ranked by four training labelers (noise p = "
        f"{r['noise']}: {r['train_pool_pairs']} pairs in all). Accuracy on the test prompts' pairs: `rule` against the "
        "noise-free hidden rule (1.0 = perfect), `held-out` against two held-out noisy labelers (ceiling 1 - p = "
        f"0.84). One training run per point. Labelers' rule: `{r['rule']}`"
        + (f"; samples cut to {r['cap']} tokens." if r["cap"] else "."), "",
        "| recipe | " + " | ".join(f"{n} pairs" for n in next(iter(r["curve"].values()))) + " |",
        "|---" * (1 + len(next(iter(r["curve"].values())))) + "|"]
    for name, points in r["curve"].items():
        lines.append(f"| {name} (rule / held-out) | "
                     + " | ".join(f"{p['rule']:.3f} / {p['held_out']:.3f}" for p in points.values()) + " |")
    for name, points in r["curve"].items():
        lines.append(f"| {name}: training seconds | " + " | ".join(f"{p['train_seconds']:.0f}" for p in points.values())
                     + " |")
    if r["caps"]:
        lines += ["", "Labeling sample length (the default recipe; the same samples cut shorter):", "",
                  "| cap (tokens) | tokens per sample | 2000 pairs (rule / held-out) | 4000 pairs |", "|---|---|---|---|"]
        for cap, points in {**r["caps"], 128: r["cap128"]}.items():
            tokens = points[2000].get("tokens_per_sample", r["tokens_per_sample_128"])
            lines.append(f"| {cap} | {tokens:.0f} | " + " | ".join(
                f"{points[n]['rule']:.3f} / {points[n]['held_out']:.3f}" for n in (2000, 4000)) + " |")
    if r["k4_vs_k9"]:
        lines += ["", "K = 4 against K = 9 for the same number of sampled completions:", "",
                  "| completions sampled | K = 4: rankings, pairs, rule / held-out | K = 9: rankings, pairs, rule / held-out |",
                  "|---|---|---|"]
        for samples, ks in r["k4_vs_k9"].items():
            lines.append(f"| {samples} | " + " | ".join(
                f"{p['rankings']}, {p['pairs']}, {p['rule']:.3f} / {p['held_out']:.3f}" for p in ks.values()) + " |")
    lines += ["", f"![learning curve]({PNG.name})"]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, points in r["curve"].items():
        sizes = [p["pairs"] for p in points.values()]
        axes[0].plot(sizes, [p["rule"] for p in points.values()], "o-", label=name)
        axes[1].plot(sizes, [p["held_out"] for p in points.values()], "o-", label=name)
    axes[0].set(title="agreement with the noise-free rule", xlabel="training pairs", ylabel="pairwise accuracy",
                xscale="log", ylim=(0.45, 1.0))
    axes[1].axhline(1 - NOISE_P, ls="--", c="grey", label=f"ceiling 1 - p = {1 - NOISE_P:.2f}")
    axes[1].set(title="agreement with held-out noisy labelers", xlabel="training pairs", xscale="log",
                ylim=(0.45, 0.9))
    ticks = sorted({p["pairs"] for points in r["curve"].values() for p in points.values()})
    for ax in axes:
        ax.axhline(0.5, ls=":", c="grey")
        ax.set_xticks(ticks, [f"{n:,}" for n in ticks])  # the measured sizes, not log-scale minor labels
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trunk_cost(rounds: int = 4, rows: int = 16, length: int = 100, threads: int = 2) -> dict[str, Any]:
    """Seconds of the frozen trunk's pass (``RewardModel.trunk_rows``, what the head-only RM
    computes once per completion) for the default head, cut at its deepest pooled layer,
    against the same head reading the final state (the whole trunk): ``rows`` rows of
    ``length`` tokens, the two alternating for ``rounds`` rounds so that a busy machine
    weighs on both alike."""
    import statistics

    import torch

    from common.models import ensure_embedded_model
    from trainer.config import RMConfig
    from trainer.reward_model import RewardModel

    torch.set_num_threads(threads)
    model_dir, config = ensure_embedded_model(), RMConfig()
    models = {name: RewardModel.from_pretrained_lm(model_dir, dtype="float32", device="cpu", head=config.head,
                                                   pool_depths=config.pool_depths, head_last_state=last_state).eval()
              for name, last_state in (("cut", False), ("whole", True))}
    input_ids = torch.randint(100, 40000, (rows, length), generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, rm in models.items():
            started = time.perf_counter()
            rm.trunk_rows(input_ids, torch.ones_like(input_ids), 0)
            seconds[name].append(time.perf_counter() - started)
    return {"seconds": seconds, "layers": {name: len(rm.backbone.layers) for name, rm in models.items()},
            "ratio": statistics.median(seconds["cut"]) / statistics.median(seconds["whole"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="the curves only, of the default recipe unless --recipes (docs/reward-curve.png is left alone)")
    parser.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=None)
    parser.add_argument("--rule", choices=sorted(RULES), default="concise_polite",
                        help="the rule the simulated labelers follow (default: the demo's)")
    parser.add_argument("--cap", type=int, default=None, help="cut the curves' samples to this many tokens (with --quick)")
    parser.add_argument("--noise", type=float, default=NOISE_P,
                        help="the training labelers' noise p (held-out labelers keep 0.16; 0: the rule's own rankings; with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--trunk-cost", action="store_true",
                        help="only time the trunk's pass, cut at the pooled layer against whole (no curves)")
    args = parser.parse_args(argv)
    if args.trunk_cost:
        cost = trunk_cost()
        print(f"trunk pass, 16 rows x 100 tokens, 2 threads: cut ({cost['layers']['cut']} layers) "
              f"{', '.join(f'{s:.2f}' for s in cost['seconds']['cut'])} s; whole ({cost['layers']['whole']} layers) "
              f"{', '.join(f'{s:.2f}' for s in cost['seconds']['whole'])} s; median ratio {cost['ratio']:.2f}x")
        return 0
    if (args.cap is not None or args.noise != NOISE_P) and not args.quick:
        parser.error("--cap and --noise change the curves only: use them with --quick")
    results = run(args.sizes, quick=args.quick, recipes=args.recipes, rule=args.rule, cap=args.cap, noise=args.noise)
    report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
