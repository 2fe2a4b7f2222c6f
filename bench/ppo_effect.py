"""What one cycle's PPO does to the policy, by the noise-free rule: the chooser of the demo's
PPO recipe (issue 12, item 3: "PPO that moves the policy within a cycle").

The setting is the first cycle of ``scripts/demo.py --no-demonstrations``: no SFT, so PPO
starts from the embedded model (v0), which is also its KL reference. Its reward model is
trained as the loop trains it (``scripts/demo_trainer.toml``'s ``[cycle.rm]``) on the
embedded model's own samples (K = 9, cut to the demo's 64 labeling tokens;
``bench.policy_samples``) ranked by four noisy training labelers (``bench.reward_curve``'s
split), on the first ``--pairs`` pairwise comparisons (the demo's first cycle has about
2,000). Then each PPO variant runs from v0 on prompts of the training pool, and its greedy
answers to the 64 test prompts (never ranked, never trained on) are compared with v0's by
the noise-free rule: the win rate (ties half) is what PPO alone did to the policy, as the
demo's ``rule_vs_start`` column measures it. The same comparison on every prompt neither
ranked for the RM nor given to PPO (about 200; the 64 test prompts among them) is reported
beside it with its standard error, on the greedy answers and on two answers per prompt
sampled at PPO's temperature (the one the demo serves its users at: what they get). Its
figures also give the wall time, the final
KL to v0 (PPO's own estimate on its last rollouts) and the RM score of the last rollouts.

The variants start from the demo's ``[cycle.ppo]`` section as it was until 2026-12-04
(``BASE``: fp32, 3 iterations of 12 rollouts) and change one thing each, so a row against
``fp32, 3 iterations`` is an ablation; ``demo`` is the section as it is now. A recipe must not be chosen for one labeler's rule:
``--rule`` ranks the samples (and scores the answers) by another rule of
``clients.simulated_labeler.RULES``.

    python -m bench.ppo_effect [--rule concise_polite] [--pairs 2000] [--variants NAME ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import report

DEMO_TOML = Path(__file__).resolve().parent.parent / "scripts" / "demo_trainer.toml"
LABEL_TOKENS = 64  # the demo's labeling sample length (scripts/demo.py Plan.label_max_new_tokens)
PPO_PROMPTS = 32  # the demo's first cycle: 32 new train-split prompts (Plan.first_train_prompts)
SAMPLED_ANSWERS = 2  # sampled answers per unseen prompt, at the served temperature, per model
# Each variant: overrides of the demo's [cycle.ppo] (cycle.ppo.* keys without the prefix). The
# ablations change one thing of BASE, the demo's PPO until 2026-12-04 (fp32, 3 iterations of 12).
BASE = ["dtype=float32", "iterations=3"]
TOP6 = ["train_mode=top_layers", "top_layers=6"]  # backward through the top 6 of 30 layers only
KL_1_NAT = ["kl_control=adaptive", "kl_target=1.0", "kl_horizon=64"]  # adaptive beta, target 1 nat per answer

VARIANTS: dict[str, list[str]] = {
    "demo": [],  # scripts/demo_trainer.toml as it is: bf16 autocast, 4 iterations, rollouts at 0.7
    "fp32, 3 iterations": BASE,
    "lr 6e-5": BASE + ["policy_lr=6e-5", "value_lr=6e-5"],
    "lr 2e-4": BASE + ["policy_lr=2e-4", "value_lr=2e-4"],
    "minibatch 2": BASE + ["minibatch_size=2"],
    "2 epochs": BASE + ["ppo_epochs=2"],
    "6 iterations": ["dtype=float32", "iterations=6"],
    "24 iterations": ["dtype=float32", "iterations=24"],
    "lora": BASE + ["train_mode=lora"],
    "lora, lr 1e-3": BASE + ["train_mode=lora", "policy_lr=1e-3", "value_lr=1e-3"],
    "rloo, 4 per prompt": BASE + ["advantage_estimator=rloo", "samples_per_prompt=4"],
    "rloo, 4 per prompt, lr 6e-5": BASE + ["advantage_estimator=rloo", "samples_per_prompt=4", "policy_lr=6e-5"],
    "rloo, 4 per prompt, 6 iterations": ["dtype=float32", "iterations=6", "advantage_estimator=rloo",
                                         "samples_per_prompt=4"],
    "rloo, 4 per prompt, 24 iterations": ["dtype=float32", "iterations=24", "advantage_estimator=rloo",
                                          "samples_per_prompt=4"],
    "64-token rollouts": BASE + ["max_new_tokens=64"],
    "rloo, 4 per prompt, 64-token rollouts": BASE + ["advantage_estimator=rloo", "samples_per_prompt=4",
                                                     "max_new_tokens=64"],
    "bf16 autocast": ["dtype=bfloat16", "iterations=3"],
    "rollouts at temperature 1.0": ["temperature=1.0"],  # the demo until 2026-12-05
    "rollouts at temperature 0.7": ["temperature=0.7"],  # the demo now
    "rollouts at temperature 0.5": ["temperature=0.5"],
    # train_mode "top_layers" on the demo's section (TOP6)
    "top 6 layers": TOP6,
    "top 6 layers, 6 iterations": TOP6 + ["iterations=6"],
    "top 6 layers, 6 iterations, lr 6e-5": TOP6 + ["iterations=6", "policy_lr=6e-5", "value_lr=6e-5"],
    # more rollouts per cycle at what top-layers PPO saves: 12 iterations cost about the demo's 4 full ones x 2
    "top 6 layers, 12 iterations": TOP6 + ["iterations=12"],
    "top 6 layers, 24 iterations": TOP6 + ["iterations=24"],
    # how far PPO gets with what a cycle cannot afford: 1,152 rollouts (36 passes over the 32 prompts)
    "top 6 layers, 96 iterations": TOP6 + ["iterations=96"],
    # the same with a KL budget near best-of-8's (1.2 nats per answer, bench.best_of_n): the adaptive controller,
    # its horizon short enough to move beta up to ~35x within the run
    "top 6 layers, 96 iterations, KL target 1 nat": TOP6 + ["iterations=96"] + KL_1_NAT,
    # within a cycle's budget: the same 1-nat budget at 288 rollouts, as 24 iterations of 12 and as 6 of 48 (one
    # generate call and one forward per 48 rollouts: cheaper per rollout on a CPU; the same 72 update steps)
    "top 6 layers, 24 iterations, KL target 1 nat": TOP6 + ["iterations=24"] + KL_1_NAT,
    "top 6 layers, 6 iterations of 48": TOP6 + ["iterations=6", "rollouts_per_iteration=48",
                                                "forward_batch_size=24"],
    "top 6 layers, 6 iterations of 48, KL target 1 nat": TOP6 + ["iterations=6", "rollouts_per_iteration=48",
                                                                 "forward_batch_size=24"] + KL_1_NAT,
}


def demo_configs(overrides: Sequence[str] = ()) -> Any:
    """The demo trainer's cycle config with ``cycle.ppo`` overrides."""
    from trainer.loop_config import load_trainer_config

    return load_trainer_config(DEMO_TOML, [f"cycle.ppo.{o}" for o in overrides]).cycle


def duel(a: float, b: float) -> float:
    """One meeting of two scores: 1 when ``a`` is higher, 0.5 on a tie, else 0 (the win rates'
    unit here and in ``trainer.evaluate.win_rate``)."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def mean_and_error(per_prompt: Sequence[float]) -> tuple[float, float]:
    """The mean of per-prompt outcomes and its standard error (their spread / sqrt(n))."""
    import statistics

    return statistics.fmean(per_prompt), statistics.pstdev(per_prompt) / len(per_prompt) ** 0.5


def rule_win_and_error(rule: Any, prompts: Sequence[str], new: Sequence[str],
                       old: Sequence[str]) -> tuple[float, float]:
    """How often ``new`` answers beat ``old`` by the rule, ties half (as trainer.evaluate.win_rate),
    and its standard error (the per-prompt outcomes' spread / sqrt(n))."""
    return mean_and_error([duel(rule(p, x), rule(p, y)) for p, x, y in zip(prompts, new, old)])


def rule_win_over_samples(rule: Any, prompts: Sequence[str], new: Sequence[Sequence[str]],
                          old: Sequence[Sequence[str]]) -> tuple[float, float]:
    """``rule_win_and_error`` over several sampled answers per prompt: ``new[j][i]`` against
    ``old[j][i]``, the prompt's outcome the mean over its samples, so the standard error is
    taken over prompts (a prompt's samples are not independent of each other)."""
    import statistics

    per_prompt = [statistics.fmean(duel(rule(p, n[i]), rule(p, o[i])) for n, o in zip(new, old))
                  for i, p in enumerate(prompts)]
    return mean_and_error(per_prompt)


def answer_figures(rule: Any, prompts: Sequence[str], answers: Sequence[str]) -> tuple[float, float]:
    """(the rule's mean score, mean words) of one answer per prompt."""
    return (sum(rule(p, a) for p, a in zip(prompts, answers)) / len(answers),
            sum(len(a.split()) for a in answers) / len(answers))


def greedy_answers(model_dir: Path, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    return sampled_answers(model_dir, prompts, max_new_tokens, temperature=0.0, n=1)[0]


def sampled_answers(model_dir: Path, prompts: Sequence[str], max_new_tokens: int, temperature: float,
                    n: int) -> list[list[str]]:
    """``n`` answers per prompt (``[j][i]``: the j-th of prompt i; one greedy when ``temperature``
    is 0), seeds 0..n-1, so two models' j-th samples share their random stream."""
    from common.models import load_tokenizer
    from trainer.evaluate import sample_responses
    from trainer.examples import user_turn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    return [sample_responses(model, tokenizer, [user_turn(p) for p in prompts], max_new_tokens,
                             temperature=temperature, seed=j, batch_size=16) for j in range(n)]


def run(rule: str = "concise_polite", pairs: int = 2000, variants: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    from bench.policy_samples import load_or_sample
    from bench.reward_curve import K, comparisons_for, first_pairs, ordered_pairs
    from clients.prompts import load_prompts
    from clients.simulated_labeler import rule_from_name
    from common import paths
    from common.models import ensure_embedded_model, load_tokenizer
    from trainer.examples import PromptExample, user_turn
    from trainer.loop_config import config_to_dict
    from trainer.ppo import train_ppo
    from trainer.rm_training import train_reward_model

    torch.manual_seed(0)
    model_dir = ensure_embedded_model()
    tokenizer = load_tokenizer(model_dir)
    full = load_or_sample(model_dir, [p.text for p in load_prompts()], k=K, max_tokens=128)
    samples = full.truncated(LABEL_TOKENS, tokenizer)
    split = comparisons_for(samples, rule=rule)
    score = rule_from_name(rule)
    test = [samples.rows[int(c.prompt_id)].prompt for c in split.test_rule]
    train = first_pairs(split.train, pairs)
    # PPO's prompts: pool prompts the RM did not rank (the loop's fresh prompts are new ones).
    ppo_prompts = [PromptExample(c.prompt_id, user_turn(samples.rows[int(c.prompt_id)].prompt))
                   for c in split.train[len(train):len(train) + PPO_PROMPTS]]
    # A second, larger view: every prompt neither ranked for the RM nor given to PPO (the test
    # prompts and the rest of the pool: about 200), so a win rate's standard error is about half
    # the 64 test prompts' 0.06.
    used = {c.prompt_id for c in train} | {p.prompt_id for p in ppo_prompts}
    unseen = [row.prompt for i, row in enumerate(samples.rows) if str(i) not in used]
    cycle = demo_configs()
    results: dict[str, Any] = {"rule": rule, "pairs": ordered_pairs(train),
                               "rankings": len(train), "ppo_prompts": len(ppo_prompts), "test_prompts": len(test),
                               "unseen_prompts": len(unseen), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        # The RM is the same for every variant of one recipe, rule and size: kept beside the samples.
        recipe = hashlib.sha256(json.dumps(config_to_dict(cycle.rm), sort_keys=True).encode()).hexdigest()[:8]
        rm_dir = paths.data_dir() / "bench" / f"ppo-effect-rm-{full.model_fingerprint[:12]}-{recipe}-{rule}-{pairs}"
        if not (rm_dir / "rm.json").exists():
            bias = [(user_turn(row.prompt), row.texts[0]) for row in samples.rows[:32]]
            rm = train_reward_model(model_dir, train, split.test_rule + split.test_held_out, cycle.rm, rm_dir,
                                    bias_prompts=bias)
            groups = rm.val["by_group"]
            (rm_dir / "rm.json").write_text(json.dumps({"rule": groups["rule"]["accuracy"],
                                                        "held_out": groups["held-out"]["accuracy"],
                                                        "seconds": time.perf_counter() - started}))
        results["rm"] = json.loads((rm_dir / "rm.json").read_text())
        print(f"RM on {results['pairs']} pairs: rule {results['rm']['rule']:.3f} "
              f"held-out {results['rm']['held_out']:.3f}", flush=True)
        max_new = cycle.eval.max_new_tokens
        start_answers = greedy_answers(model_dir, test, max_new)
        start_unseen = greedy_answers(model_dir, unseen, max_new)
        # What the users get: answers sampled at the temperature the demo serves and PPO samples at.
        served_t = cycle.ppo.temperature
        start_sampled = sampled_answers(model_dir, unseen, max_new, served_t, SAMPLED_ANSWERS)
        for name in variants or list(VARIANTS):
            ppo_cfg = demo_configs(VARIANTS[name]).ppo
            started = time.perf_counter()
            out = train_ppo(model_dir, model_dir, rm_dir, ppo_prompts, ppo_cfg, work / name, progress=False)
            seconds = time.perf_counter() - started
            answers = greedy_answers(work / name, test, max_new)
            unseen_win, unseen_se = rule_win_and_error(score, unseen, greedy_answers(work / name, unseen, max_new),
                                                       start_unseen)
            sampled = sampled_answers(work / name, unseen, max_new, served_t, SAMPLED_ANSWERS)
            sampled_win, sampled_se = rule_win_over_samples(score, unseen, sampled, start_sampled)
            last = out.history[-1]
            rule_mean, mean_words = answer_figures(score, test, answers)
            row = {"rule_vs_start": rule_win_and_error(score, test, answers, start_answers)[0], "seconds": seconds,
                   "rule_vs_start_unseen": unseen_win, "rule_vs_start_unseen_se": unseen_se,
                   "rule_vs_start_sampled": sampled_win, "rule_vs_start_sampled_se": sampled_se,
                   "kl_last": last["kl_ref"], "rm_score_first": out.history[0]["rm_score"],
                   "rm_score_last": last["rm_score"], "approx_kl": last.get("approx_kl"),
                   "clip_frac": last.get("clip_frac"),
                   "mean_words": mean_words, "rule_mean": rule_mean,
                   "changed": sum(a != b for a, b in zip(answers, start_answers)) / len(test),
                   "stopped_fraction": sum(h["stopped_fraction"] for h in out.history) / len(out.history),
                   "phase_seconds": {k: sum(h["seconds"].get(k, 0.0) for h in out.history)
                                     for k in out.history[0]["seconds"]},
                   "overrides": VARIANTS[name]}
            results["variants"][name] = row
            print(f"{name:32s} rule vs start {row['rule_vs_start']:.3f} (unseen {unseen_win:.3f} +- {unseen_se:.3f}, "
                  f"sampled at {served_t} {sampled_win:.3f} +- {sampled_se:.3f})  "
                  f"{seconds:5.0f} s  kl {row['kl_last']:.3f}  "
                  f"rm {row['rm_score_first']:.3f} -> {row['rm_score_last']:.3f}  words {row['mean_words']:.1f}  "
                  f"changed {row['changed']:.2f}",
                  flush=True)
        results["start_rule_mean"], results["start_mean_words"] = answer_figures(score, test, start_answers)
        results["sampled"] = {"temperature": served_t, "per_prompt": SAMPLED_ANSWERS}
    results["markdown"] = markdown(results)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as docs/BENCHMARKS.md's table."""
    sampled = results["sampled"]
    lines = [f"| variant | rule win vs v0 | on {results['unseen_prompts']} unseen prompts (± s.e.) | "
             f"{sampled['per_prompt']} samples each at {sampled['temperature']} (± s.e.) | rule mean "
             f"(v0 {results['start_rule_mean']:.3f}) | answers changed | KL to v0 (nats/seq) | approx-KL per update | "
             f"clip fraction | words (v0 {results['start_mean_words']:.1f}) | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in results["variants"].items():
        lines.append(f"| {name} | {v['rule_vs_start']:.3f} | {v['rule_vs_start_unseen']:.3f} ± "
                     f"{v['rule_vs_start_unseen_se']:.3f} | {v['rule_vs_start_sampled']:.3f} ± "
                     f"{v['rule_vs_start_sampled_se']:.3f} | {v['rule_mean']:.3f} | {v['changed']:.2f} | "
                     f"{v['kl_last']:.2f} | {v['approx_kl']:.5f} | {v['clip_frac']:.3f} | {v['mean_words']:.1f} | "
                     f"{v['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="concise_polite", help="the labelers' rule (clients.simulated_labeler)")
    parser.add_argument("--pairs", type=int, default=2000, help="pairwise comparisons the RM trains on")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = run(args.rule, args.pairs, args.variants)
    report(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
