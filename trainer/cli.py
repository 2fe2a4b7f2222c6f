"""`rlhf train sft|rm|ppo`: run one training stage by hand, from JSONL files.

    rlhf train sft --model DIR --demos FILE.jsonl --out DIR [--val-demos FILE] [--rm DIR] [--set k=v ...]
    rlhf train rm  --model DIR --rankings FILE.jsonl --out DIR [--val-rankings FILE] [--set k=v ...]
    rlhf train ppo --policy DIR --rm DIR --prompts FILE.jsonl --out DIR [--ref DIR] [--corpus FILE ...]

Each writes ``metrics.json`` (the stage's result and the config used) into ``--out``.

JSONL formats (one object per line):
- demonstrations: ``{"messages": [...]}``, the last message is the assistant's response;
- rankings, K-way: ``{"prompt": str | "messages": [...], "completions": [str, ...],
  "ranking": [[i, j], [k], ...]}`` (best-first groups of completion INDEXES; a group is a
  tie), optional ``labeler_group``, ``labeler_id``, ``prompt_id``; also the lossless
  ``rlhf export rankings`` lines (completion objects with ids, groups of ids);
- rankings, pairwise: ``{"prompt", "chosen", "rejected"}`` (TRL's format, K = 2; the
  conversational variant with message lists too);
- prompts: ``{"prompt": str}`` or ``{"messages": [...]}``, optional ``prompt_id``.

Without ``--val-*`` files, a seeded 10% of the training file is held out for validation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.config import RMConfig, SFTConfig, config_from_overrides
from trainer.examples import Comparison, Demonstration, Messages, PromptExample, user_turn

# ---------------------------------------------------------------------------- JSONL readers


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Objects of a JSONL file (blank lines skipped); errors name the line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            rows.append(row)
    return rows


def _messages(value: Any, where: str) -> Messages:
    if isinstance(value, str):
        return user_turn(value)
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return tuple({"role": str(m["role"]), "content": str(m["content"])} for m in value)
    if isinstance(value, dict):  # `rlhf export rankings` prompt row
        if value.get("messages"):
            return _messages(value["messages"], where)
        return _messages(value.get("text"), where)
    raise ValueError(f"{where}: a prompt must be a string or a list of {{role, content}} messages")


def _prompt_of(row: dict[str, Any], where: str) -> Messages:
    if "messages" in row:
        return _messages(row["messages"], where)
    if "prompt" in row:
        return _messages(row["prompt"], where)
    raise ValueError(f"{where}: needs 'prompt' or 'messages'")


def _assistant_text(value: Any, where: str) -> str:
    """A completion: a string, or (conversational) the last assistant message's content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1]["content"])
    raise ValueError(f"{where}: a completion must be a string or a list of messages")


def demonstration_from_row(row: dict[str, Any], where: str = "row") -> Demonstration:
    messages = _messages(row.get("messages"), where)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's response")
    return Demonstration(messages[:-1], messages[-1]["content"], prompt_id=str(row.get("prompt_id", "")))


def comparison_from_row(row: dict[str, Any], where: str = "row") -> Comparison:
    """A K-way ranking line or a pairwise (TRL) line as a ``Comparison``."""
    extra = {"labeler_group": str(row.get("labeler_group", "")), "labeler_id": str(row.get("labeler_id", "")),
             "prompt_id": str(row.get("prompt_id", ""))}
    if "chosen" in row and "rejected" in row:
        return Comparison(_prompt_of(row, where), (_assistant_text(row["chosen"], where),
                                                   _assistant_text(row["rejected"], where)), (0, 1), **extra)
    if "completions" not in row or "ranking" not in row:
        raise ValueError(f"{where}: needs 'completions' and 'ranking', or 'chosen' and 'rejected'")
    completions = row["completions"]
    if completions and all(isinstance(c, dict) for c in completions):  # lossless export: ids
        ids = [str(c["id"]) for c in completions]
        texts = [str(c["text"]) for c in completions]
        if isinstance(row["prompt"], dict) and not extra["prompt_id"]:
            extra["prompt_id"] = str(row["prompt"].get("id", ""))
    else:
        ids = [str(i) for i in range(len(completions))]
        texts = [str(c) for c in completions]
    rank_of = {}
    for rank, group in enumerate(row["ranking"]):
        for member in group:
            rank_of[str(member)] = rank
    if sorted(rank_of) != sorted(ids):
        raise ValueError(f"{where}: the ranking must name every completion exactly once")
    return Comparison(_prompt_of(row, where), tuple(texts), tuple(rank_of[i] for i in ids), **extra)


def prompt_from_row(row: dict[str, Any], number: int, where: str = "row") -> PromptExample:
    return PromptExample(str(row.get("prompt_id", number)), _prompt_of(row, where))


def _read(path: Path | str, parse) -> list:
    return [parse(row, f"{path}:{i}") for i, row in enumerate(read_jsonl(path), 1)]


def holdout_split(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded ``fraction`` held out (at least 1 item when there are 2 or more)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * fraction)) if len(items) >= 2 else 0
    val_idx = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


# ---------------------------------------------------------------------------- subcommands


def _write_metrics(out_dir: Path, result: dict[str, Any], config: Any) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps({"result": result, "config": _as_dict(config)}, indent=2, default=str) + "\n",
                    encoding="utf-8")
    return path


def _as_dict(config: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))


def run_sft(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.reward_model import RewardModel
    from trainer.sft import train_sft

    config = config_from_overrides(SFTConfig, args.set)
    demos = _read(args.demos, demonstration_from_row)
    if args.val_demos:
        train, val = demos, _read(args.val_demos, demonstration_from_row)
    else:
        train, val = holdout_split(demos, args.val_fraction, config.seed)
    rm = RewardModel.load(args.rm) if args.rm else None
    result = train_sft(args.model, train, val, config, args.out, reward_model=rm)
    return _finish(args.out, result.to_dict(), config)


def run_rm(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.rm_training import train_reward_model

    config = config_from_overrides(RMConfig, args.set)
    comparisons = _read(args.rankings, comparison_from_row)
    if args.val_rankings:
        train, val = comparisons, _read(args.val_rankings, comparison_from_row)
    else:
        train, val = holdout_split(comparisons, args.val_fraction, config.seed)
    demos = _read(args.demos, demonstration_from_row) if args.demos else None
    result = train_reward_model(args.model, train, val, config, args.out, demonstrations=demos)
    return _finish(args.out, result.to_dict(), config)


def run_ppo(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from trainer.ppo import PPOConfig, train_ppo
    except ImportError as exc:
        raise SystemExit(f"rlhf train ppo: trainer.ppo is not available ({exc})") from exc
    config = config_from_overrides(PPOConfig, args.set)
    prompts = [prompt_from_row(row, i) for i, row in enumerate(read_jsonl(args.prompts), 1)]
    corpus = _corpus_texts(args.corpus)
    result = train_ppo(args.policy, args.ref or args.policy, args.rm, prompts, config, args.out, corpus,
                       progress=sys.stderr.isatty())
    as_dict = result.to_dict() if hasattr(result, "to_dict") else result
    return _finish(args.out, as_dict, config)


def _corpus_texts(paths: Sequence[str] | None) -> list[str] | None:
    """Pretraining documents of the given plain-text files; None lets PPO use the shipped
    corpus minus its held-out slice."""
    if not paths:
        return None
    from trainer.corpus import load_corpus

    return load_corpus(paths)


def _finish(out: str, result: dict[str, Any], config: Any) -> dict[str, Any]:
    path = _write_metrics(Path(out), result, config)
    print(f"wrote {out} ({path.name})")
    return result


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf train", description="Run one training stage by hand.")
    stages = parser.add_subparsers(dest="stage", required=True)
    override = {"action": "append", "default": [], "metavar": "KEY=VALUE",
                "help": "override a config field (repeatable), e.g. --set epochs=2"}

    sft = stages.add_parser("sft", help="supervised fine-tuning on demonstrations")
    sft.add_argument("--model", required=True, help="causal-LM folder to start from")
    sft.add_argument("--demos", required=True, help="demonstrations JSONL ({'messages': [...]})")
    sft.add_argument("--val-demos", help="validation demonstrations JSONL (default: hold out --val-fraction)")
    sft.add_argument("--rm", help="reward-model folder: select the epoch by RM score of greedy samples")
    sft.add_argument("--out", required=True, help="output model folder")
    sft.add_argument("--val-fraction", type=float, default=0.1)
    sft.add_argument("--set", **override)
    sft.set_defaults(run=run_sft)

    rm = stages.add_parser("rm", help="reward model from K-way or pairwise rankings")
    rm.add_argument("--model", required=True, help="causal-LM folder (the SFT policy) for the backbone")
    rm.add_argument("--rankings", required=True, help="rankings JSONL (K-way or pairwise)")
    rm.add_argument("--val-rankings", help="held-out rankings JSONL (default: hold out --val-fraction)")
    rm.add_argument("--demos", help="demonstrations JSONL: the bias makes them score mean 0")
    rm.add_argument("--out", required=True, help="output reward-model folder")
    rm.add_argument("--val-fraction", type=float, default=0.1)
    rm.add_argument("--set", **override)
    rm.set_defaults(run=run_rm)

    ppo = stages.add_parser("ppo", help="PPO-ptx against a reward model")
    ppo.add_argument("--policy", required=True, help="policy folder to start from (the SFT model)")
    ppo.add_argument("--ref", help="frozen reference for the KL penalty (default: --policy)")
    ppo.add_argument("--rm", required=True, help="reward-model folder")
    ppo.add_argument("--prompts", required=True, help="prompts JSONL")
    ppo.add_argument("--corpus", action="append",
                     help="plain-text pretraining file (repeatable; default: the shipped corpus's train slice)")
    ppo.add_argument("--out", required=True, help="output policy folder")
    ppo.add_argument("--set", **override)
    ppo.set_defaults(run=run_ppo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`rlhf train STAGE ...` (the top-level `rlhf` passes the arguments after `train`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # `python -m trainer.cli train sft ...`
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rlhf train {args.stage}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
