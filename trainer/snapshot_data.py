"""Store rows -> the records one training cycle uses.

A cycle reads a SNAPSHOT of the store (``Store.snapshot``: one consistent file), never
the live database, so the server's writes during a cycle change nothing it trains on.
``read_rows`` loads what training needs from it; ``split_cycle_data`` maps the rows that
data hygiene kept (``trainer.hygiene.run_hygiene`` on ``prompt_records``) to the plain
records of ``trainer.data``, by split:

- PPO prompts: TRAIN-split prompts logged after ``since`` (the newest ``max_ppo_prompts``);
- comparisons (one per ranking) and demonstrations: every split, the train split trains,
  val measures (and trains the gate's independent judge);
- held-out labelers' comparisons (``held_out_groups``, the paper's held-out labelers): never
  trained on, whatever their split; they only measure how well the reward models generalise
  to people whose judgements they never saw. Their demonstrations train nothing either
  (neither SFT nor the reward models' bias). A held-out ranking of a completion set that a
  training labeler ranked too (a shared or gold labeling task) is left out of them: the
  reward model trained on that very set, so it would not measure generalisation;
- evaluation prompts: the prompts of ``eval_splits`` (never train), oldest first.

Users who opted out of training (``users.train_opt_out``) are left out at the read, with
their prompts' rankings and demonstrations and their own labeling work: nothing of theirs
trains or measures (they are served as usual). A prompt dropped by hygiene drops its
rankings and demonstrations too; a redacted prompt trains on its redacted text and
turns. A completion flagged for PII at ingest trains (the reward models) as its redacted
text, the text its labeler was shown.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from sqlite_utils import Database

from common.pii import safe_text
from common.store.ops.users import opted_out_user_ids
from common.store.records import Completion, Demonstration, Prompt, Ranking, from_row
from trainer.examples import Comparison, Messages, PromptExample, ranks_from_groups, user_turn
from trainer.examples import Demonstration as DemoExample
from trainer.hygiene import PromptRecord

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class StoreRows:
    """The rows of one snapshot a cycle trains on; completions only where a ranking names them.
    ``opted_out``: the users whose data was left out (``read_rows``)."""

    prompts: list[Prompt]
    completions: dict[str, Completion]
    rankings: list[Ranking]
    demonstrations: list[Demonstration]
    opted_out: frozenset[str] = frozenset()


def read_rows(db: Database) -> StoreRows:
    """Op: load prompts, rankings, the completions they rank, and demonstrations, without
    the data of users who opted out of training (``users.train_opt_out``): their prompts,
    the rankings and demonstrations of those prompts, and their own rankings and
    demonstrations as labelers. Left out here, no later step (hygiene, splits, the judge,
    evaluation) can train or measure on them."""
    opted_out = opted_out_user_ids()(db)
    prompts = [from_row(Prompt, r) for r in db.query("SELECT * FROM prompts ORDER BY created_at, id")]
    prompts = [p for p in prompts if p.user_id not in opted_out]
    usable = {p.id for p in prompts}
    rankings = [from_row(Ranking, r) for r in db.query("SELECT * FROM rankings ORDER BY created_at, id")]
    rankings = [r for r in rankings if r.prompt_id in usable and r.labeler_id not in opted_out]
    ranked_ids = {cid for r in rankings for group in r.ranking for cid in group}
    ranked = db.query(
        "SELECT * FROM completions WHERE id IN (SELECT c.value FROM rankings AS r, "
        "json_each(r.ranking_json) AS g, json_each(g.value) AS c)"
    )
    completions = {r["id"]: from_row(Completion, r) for r in ranked if r["id"] in ranked_ids}
    demos = [from_row(Demonstration, r) for r in db.query("SELECT * FROM demonstrations ORDER BY created_at, id")]
    demos = [d for d in demos if d.prompt_id in usable and d.labeler_id not in opted_out]
    return StoreRows(prompts, completions, rankings, demos, opted_out)


def prompt_records(prompts: Sequence[Prompt]) -> list[PromptRecord]:
    """The hygiene view of stored prompts (text = the prompt, or a chat's last user turn;
    every turn of a chat, and the PII flag set at ingest)."""
    return [PromptRecord(p.id, p.user_id, p.text, p.created_at, p.split,
                         messages=None if p.messages is None else tuple(p.messages), has_pii=p.has_pii)
            for p in prompts]


def messages_for(prompt: Prompt, text: str, turns: Sequence[dict[str, str]] | None = None) -> Messages:
    """The chat to train on: ``turns`` (hygiene's, possibly redacted) or else the stored
    conversation, with its last user turn set to ``text`` (hygiene's possibly redacted
    version); or a one-turn chat."""
    turns = [dict(m) for m in (turns if turns is not None else prompt.messages or [])]
    users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
    if not users:
        return user_turn(text)
    turns[users[-1]]["content"] = text
    return tuple(turns)


@dataclass
class CycleData:
    """What one cycle trains and evaluates on, after hygiene, by split."""

    ppo_prompts: list[PromptExample]
    eval_prompts: list[PromptExample]
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)  # training labelers' only
    demonstrations: dict[str, list[DemoExample]] = field(default_factory=dict)
    held_out_comparisons: list[Comparison] = field(default_factory=list)  # held-out labelers', every split
    demonstrations_sha256: str = ""  # of the train+val demonstration ids: SFT reruns when it changes

    def counts(self) -> dict[str, int]:
        """Sizes for the cycle's metrics."""
        sizes = {"ppo_prompts": len(self.ppo_prompts), "eval_prompts": len(self.eval_prompts)}
        for split in SPLITS:
            sizes[f"comparisons_{split}"] = len(self.comparisons.get(split, []))
            sizes[f"demonstrations_{split}"] = len(self.demonstrations.get(split, []))
        sizes["comparisons_held_out"] = len(self.held_out_comparisons)
        return sizes


def split_cycle_data(
    rows: StoreRows,
    kept: Sequence[PromptRecord],
    *,
    since: float,
    until: float,
    max_ppo_prompts: int,
    ppo_sources: Sequence[str],
    eval_splits: Sequence[str],
    max_eval_prompts: int | None,
    held_out_groups: Sequence[str] = (),
) -> CycleData:
    """Map the rows of the prompts hygiene ``kept`` to training records (module docstring)."""
    stored = {p.id: p for p in rows.prompts}
    messages = {k.id: messages_for(stored[k.id], k.text, k.messages) for k in kept}
    split_of = {k.id: str(k.split) for k in kept}

    new_train = [k for k in kept if k.split == "train" and since < k.created_at <= until
                 and stored[k.id].source in ppo_sources]
    newest = sorted(new_train, key=lambda k: k.created_at)[-max_ppo_prompts:] if max_ppo_prompts else []
    held_out = [k for k in sorted(kept, key=lambda k: k.created_at) if k.split in eval_splits]
    held_out = held_out[:max_eval_prompts] if max_eval_prompts is not None else held_out

    comparisons = _comparisons(rows, messages)
    training = _by_split([c for c in comparisons if c.labeler_group not in held_out_groups], split_of)
    trained_sets = {_completion_set(c) for c in training.get("train", [])}
    data = CycleData(
        ppo_prompts=[PromptExample(k.id, messages[k.id]) for k in newest],
        eval_prompts=[PromptExample(k.id, messages[k.id]) for k in held_out],
        comparisons=training,
        demonstrations=_by_split(_demonstrations(rows, messages, held_out_groups), split_of),
        held_out_comparisons=[c for c in comparisons if c.labeler_group in held_out_groups
                              and _completion_set(c) not in trained_sets],
    )
    used_demos = sorted(d.id for d in rows.demonstrations if split_of.get(d.prompt_id) in ("train", "val")
                        and d.labeler_group not in held_out_groups)
    data.demonstrations_sha256 = hashlib.sha256("\n".join(used_demos).encode()).hexdigest() if used_demos else ""
    return data


def _completion_set(c: Comparison) -> tuple[str, tuple[str, ...]]:
    """What a ranking ranked: its prompt and its completions' texts, in any order."""
    return c.prompt_id, tuple(sorted(c.completions))


def _comparisons(rows: StoreRows, messages: dict[str, Messages]) -> list[Comparison]:
    """One comparison per ranking of a kept prompt (ties share a rank)."""
    out = []
    for r in rows.rankings:
        ids = [cid for group in r.ranking for cid in group]
        if r.prompt_id not in messages or any(cid not in rows.completions for cid in ids):
            continue
        completions = [rows.completions[c] for c in ids]
        out.append(Comparison(
            messages=messages[r.prompt_id],
            completions=tuple(safe_text(c.text, c.has_pii, c.redacted_text) for c in completions),
            ranks=ranks_from_groups(r.ranking, ids), labeler_group=r.labeler_group or "",
            labeler_id=r.labeler_id, prompt_id=r.prompt_id,
            stopped=tuple(c.finish_reason == "stop" for c in completions),
            policy_versions=tuple(None if c.mixed_versions else c.policy_version for c in completions)))
    return out


def _demonstrations(rows: StoreRows, messages: dict[str, Messages], held_out_groups: Sequence[str]
                    ) -> list[DemoExample]:
    """Demonstrations of kept prompts, except the held-out labelers' (they train nothing)."""
    return [DemoExample(messages[d.prompt_id], d.response, d.prompt_id)
            for d in rows.demonstrations if d.prompt_id in messages and d.labeler_group not in held_out_groups]


def _by_split(items: Sequence, split_of: dict[str, str]) -> dict[str, list]:
    grouped: dict[str, list] = defaultdict(list)
    for item in items:
        grouped[split_of[item.prompt_id]].append(item)
    return {split: grouped.get(split, []) for split in SPLITS}

