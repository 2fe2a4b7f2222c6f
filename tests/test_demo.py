"""The demo's verdict (scripts/demo.py): the held-out labelers' prompt-level test and the rule's win rate."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_module():
    spec = importlib.util.spec_from_file_location("rlhf_demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_demo(module, tmp_path: Path, new: list[str], old: list[str], prompts: list[str]):
    demo = module.Demo(tmp_path, "127.0.0.1:1", {}, {}, iter(()), prompts)
    demo.answers = {0: old, 3: new}
    return demo


def test_a_policy_that_follows_the_rule_wins_significantly(demo_module, tmp_path: Path) -> None:
    prompts = [f"Tell me about rivers number {i}" for i in range(64)]
    # v3: ~20 polite, on-topic words, no digits; v0: a rambling 60-word answer with digits.
    new = ["Thanks for asking about rivers: I am glad to help with a short and clear answer about them today."] * 64
    old = ["In 1999 " + " ".join(itertools.repeat("water flows down", 20))] * 64
    result = demo_module.compare_with_v0(make_demo(demo_module, tmp_path, new, old, prompts), 3)

    assert result["rule_win_rate"] == 1.0  # the noise-free rule prefers v3 on every prompt
    held_out = [lab for lab in demo_module.LABELERS if lab[1] == demo_module.HELD_OUT]
    assert result["held_out_wins"] + result["held_out_losses"] == 64 * len(held_out)  # strict rule order: no ties
    # Each judgement is right with probability 1 - p = 0.84: far from a coin flip.
    assert 0.7 < result["held_out_win_rate"] < 0.95
    assert result["p_value"] < 1e-6
    # The prompt is the test's unit: two labelers' verdicts on one pair are not two samples, so
    # the pooled binomial test of earlier runs (kept for comparison) claims more than it may.
    assert result["p_value_pooled"] < result["p_value"]


def test_the_verdict_counts_prompts_not_judgements(demo_module, tmp_path: Path, monkeypatch) -> None:
    # Noise-free held-out labelers: both give the rule's verdict on every pair, so each prompt's
    # two verdicts are one observation said twice.
    monkeypatch.setattr(demo_module, "NOISE_P", 0.0)
    prompts = [f"Tell me about rivers number {i}" for i in range(40)]
    good = "Thanks for asking about rivers: I am glad to help with a short and clear answer about them today."
    bad = "In 1999 " + " ".join(itertools.repeat("water flows down", 20))
    # The rule prefers v3 on 25 prompts and v0 on 15 (0.625): too few prompts for p < 0.01.
    new, old = [good] * 25 + [bad] * 15, [bad] * 25 + [good] * 15
    result = demo_module.compare_with_v0(make_demo(demo_module, tmp_path, new, old, prompts), 3)
    assert result["rule_win_rate"] == 0.625
    assert (result["held_out_wins"], result["held_out_losses"]) == (50, 30)
    # The prompt-level test is the sign test of 25 of 40 prompts, p = 0.077; pooling the 50 : 30
    # verdicts would claim 0.017.
    assert result["p_value"] == pytest.approx(0.07692997208141605, rel=1e-9)
    assert result["p_value_pooled"] == pytest.approx(0.01649630921323809, rel=1e-9)


def test_identical_answers_carry_no_comparison(demo_module, tmp_path: Path) -> None:
    prompts = ["How do tides work?"] * 10
    same = ["Tides follow the moon."] * 10
    result = demo_module.compare_with_v0(make_demo(demo_module, tmp_path, same, same, prompts), 3)
    assert result["rule_win_rate"] == 0.5  # all ties count half
    assert result["held_out_wins"] == result["held_out_losses"] == 0 and result["p_value"] == 1.0


def test_the_gates_call_is_scored_by_the_rule_on_its_own_answers(demo_module) -> None:
    prompt = "Tell me about rivers"
    good = "Thanks for asking about rivers: I am glad to help with a short and clear answer about them today."
    bad = "In 1999 " + " ".join(itertools.repeat("water flows down", 20))
    examples = [{"prompt": prompt, "candidate": good, "serving": bad},  # a win by the rule
                {"prompt": prompt, "candidate": bad, "serving": good},  # a loss
                {"prompt": prompt, "candidate": good, "serving": good},  # a tie: half
                {"prompt": prompt, "candidate": good, "serving": bad}]
    assert demo_module.gate_rule_win_rate(examples) == (1 + 0 + 0.5 + 1) / 4
    assert demo_module.gate_rule_win_rate([]) is None  # a cycle that kept no answers


def test_the_newest_version_is_picked_by_number_not_by_text(demo_module) -> None:
    by_version = {"0": {"accuracy": 0.64}, "10": {"accuracy": 0.71}, "2": {"accuracy": 0.69}}
    assert demo_module.newest_version(by_version) == {"accuracy": 0.71}  # "2" > "10" as text
    assert demo_module.newest_version({}) == {}


def test_the_report_table_has_every_column(demo_module, tmp_path: Path) -> None:
    demo = make_demo(demo_module, tmp_path, ["a"], ["b"], ["q"])
    row = {name: 0.5 for name, _, _ in demo_module.COLUMNS} | {"cycle": 1, "state": "promoted", "error": ""}
    demo.rows = [row]
    text = demo_module.markdown_report(demo, "verdict", "timing")
    header = next(line for line in text.splitlines() if line.startswith("| cycle"))
    assert [c.strip() for c in header.strip("|").split("|")] == [name for name, _, _ in demo_module.COLUMNS]
    assert "| 1 | promoted |" in text


def test_no_demonstrations_runs_the_loop_on_rankings_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`scripts/demo.py --no-demonstrations` (the paper's steps 2 and 3 alone) on the tiny model
    with the HF engine and the --quick plan: a cycle trains its RM on rankings, runs PPO without
    any SFT, and the report has the same table and verdict. The tiny random model learns
    nothing worth a verdict, so exit status 1 (not significant) is allowed; a crash is not."""
    import json
    import os
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "RLHF_DATA_DIR": str(tiny_model_dir.parent.parent)}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--model", "tiny", "--engine", "hf",
                           "--quick", "--no-demonstrations", "--cycles", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    [row] = summary["rows"]
    assert row["state"] in ("promoted", "rejected"), row
    assert row["demos"] == 0 and not row["sft"]  # no demonstrations, no SFT
    assert row["rm_pairs"] and row["rm_pairs"] > 0  # the RM trained on the labelers' rankings
    assert 0.0 <= row["gate_rule"] <= 1.0  # the gate's own answers were kept and scored by the rule
    assert "held-out labelers prefer" in (out / "report.md").read_text()
    assert (out / "cycles.png").exists()
