"""Shared by the loop's tests: a store filled directly, tiny stage configs, a published v0.

`fill_store` logs prompts of users from all three splits with K = 3 completions each,
rankings from two labeler groups ("A" labels train-split prompts and half of the val
ones, "B" the rest; the rule is "shorter is better", so rankings carry signal) and a few
demonstrations. Times are explicit (`now`), so a test can tell old prompts from new.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from clients.prompts import load_prompts
from common.checkpoints import init_v0
from common.identity import split_for_user
from common.store import NewCompletion, Store, add_completions, add_demonstration, add_policy, add_prompt, add_ranking
from trainer.config import EvalConfig, RMConfig, SFTConfig
from trainer.gate import GateConfig
from trainer.loop_config import BackupConfig, CycleConfig, DataConfig, TrainerConfig, config_to_dict
from trainer.config import PPOConfig

ANSWERS = ("Sure.", "Here is a short answer for you.",
           "Here is a much longer answer that goes on and on about many things at once.")


@cache
def users_in(split: str, n: int, prefix: str = "user") -> tuple[str, ...]:
    """The first n ids `<prefix>-<i>` that hash to `split`."""
    ids = (f"{prefix}-{i}" for i in itertools.count())
    return tuple(itertools.islice((u for u in ids if split_for_user(u) == split), n))


@cache
def shipped_texts() -> tuple[str, ...]:
    """The shipped prompt set without its PII prompts, in file order."""
    return tuple(p.text for p in load_prompts() if not p.pii)


def fill_store(store: Store, *, now: float, prompts_per_user: int = 4, demos: int = 4, offset: int = 0,
               users: dict[str, int] | None = None) -> dict[str, int]:
    """Log prompts, completions, rankings and demonstrations at time `now`; return counts.

    `offset` picks other prompt texts (and users), so a second call adds NEW prompts that
    hygiene does not drop as duplicates.
    """
    users = users or {"train": 3, "val": 2, "test": 1}
    texts = iter(shipped_texts()[offset:])
    counts = {"prompts": 0, "rankings": 0, "demonstrations": 0}
    for split, n_users in users.items():
        for u, user in enumerate(users_in(split, n_users + offset // 10)[offset // 10:]):
            for j in range(prompts_per_user):
                prompt = store.write_sync(add_prompt(user, next(texts), now=now + j))
                done = store.write_sync(add_completions(prompt.id, [
                    NewCompletion(idx=i, text=a, policy_version=0, finish_reason="stop", prompt_tokens=5,
                                  completion_tokens=len(a.split()), latency_s=0.1)
                    for i, a in enumerate(ANSWERS)], now=now + j))
                group = "A" if split == "train" or u % 2 == 0 else "B"
                store.write_sync(add_ranking(prompt.id, f"labeler-{group}", [[c.id] for c in done],
                                             labeler_group=group, now=now + j))
                counts["prompts"] += 1
                counts["rankings"] += 1
                if split in ("train", "val") and counts["demonstrations"] < demos and j == 0:
                    store.write_sync(add_demonstration(prompt.id, "labeler-A", "A short, polite answer.",
                                                       labeler_group="A", now=now + j))
                    counts["demonstrations"] += 1
    return counts


def publish_v0(store: Store, root: Path, model_dir: Path) -> None:
    """What the server does at its first start: v0 = the base model, serving."""
    path = init_v0(root, model_dir, "tiny-llama")
    store.write_sync(add_policy(0, str(path.resolve()), status="serving"))


def tiny_cycle_config(**data: object) -> CycleConfig:
    """Stage configs small enough for the tiny model on 2 shared cores; a permissive gate."""
    return CycleConfig(
        data=DataConfig(**{"min_new_prompts": 4, "min_train_comparisons": 4, "min_val_comparisons": 2,
                           "min_sft_demonstrations": 2, **data}),
        sft=SFTConfig(epochs=1, batch_size=4, max_length=128, max_response_length=32, eval_batch_size=4,
                      show_progress=False, num_threads=1),
        rm=RMConfig(top_layers=1, batch_size=4, max_length=128, max_response_length=32, eval_batch_size=8,
                    show_progress=False, num_threads=1),
        ppo=PPOConfig(rollouts_per_iteration=4, iterations=1, max_new_tokens=8, ppo_epochs=1, minibatch_size=2,
                      ptx_batch_size=2, ptx_seq_len=32, forward_batch_size=4, num_threads=1),
        eval=EvalConfig(max_new_tokens=8, batch_size=4, max_prompts=4, ptx_max_length=32),
        gate=GateConfig(min_win_rate=0.0, max_kl_per_token=None, min_judge_accuracy=None, max_ptx_regression=None),
    )


def tiny_trainer_config(data_dir: Path, **fields: object) -> TrainerConfig:
    """A trainer config under `data_dir` with no server and no schedule."""
    values: dict[str, object] = dict(
        store_path=data_dir / "rlhf.sqlite", checkpoints_root=data_dir / "checkpoints",
        work_dir=data_dir / "trainer", server_address=None, schedule="off", poll_s=0.2,
        heartbeat_s=0.5, stale_after_s=30.0, cycle=tiny_cycle_config(),
        backup=BackupConfig(folder=data_dir / "backups"))
    values.update(fields)
    return TrainerConfig(**values)  # type: ignore[arg-type]


@contextlib.contextmanager
def one_cycle_loop(data_dir: Path, model_dir: Path) -> Iterator[tuple[Store, TrainerConfig, Path]]:
    """A store under ``data_dir`` with v0 serving and one cycle's data, and the trainer's
    config written to ``data_dir/trainer.json`` (for a trainer started as a process)."""
    config = tiny_trainer_config(data_dir)
    config_path = data_dir / "trainer.json"
    config_path.write_text(json.dumps(config_to_dict(config)))
    with Store(config.store_path) as store:
        publish_v0(store, config.checkpoints_root, model_dir)
        fill_store(store, now=time.time() - 60)
        yield store, config, config_path
