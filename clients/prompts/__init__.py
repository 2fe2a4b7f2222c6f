"""A shipped set of short user prompts for simulated traffic (demos, tests, benchmarks).

`prompts.jsonl` holds ~300 prompts written for this project: questions, how-tos,
instructions, advice, coding, reasoning, rewrites, classification, brainstorming and chat.
About 2% carry a fake email address or phone number (`example.com`-style domains, the
fictional 555-01xx numbers) and are marked `"pii": true`, so data hygiene has something
to find; a test checks that `trainer.hygiene.find_pii` flags exactly those. One JSON
object per line:

    {"id": "p001", "category": "question", "text": "...", "pii": false}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PROMPTS_FILE = "prompts.jsonl"


@dataclass(frozen=True)
class ShippedPrompt:
    id: str
    category: str
    text: str
    pii: bool


def load_prompts(path: str | Path | None = None) -> list[ShippedPrompt]:
    """The shipped prompt set (or another file in the same format), in file order."""
    if path is None:
        text = resources.files(__package__).joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(ShippedPrompt(str(row["id"]), str(row["category"]), str(row["text"]), bool(row.get("pii", False))))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path or PROMPTS_FILE}: line {number}: {err}") from err
    return prompts


def sample_prompts(n: int, seed: int = 0, *, include_pii: bool = True) -> list[ShippedPrompt]:
    """`n` prompts: shuffled passes over the set, as many as `n` needs (deterministic)."""
    pool = [p for p in load_prompts() if include_pii or not p.pii]
    rng = random.Random(seed)
    out: list[ShippedPrompt] = []
    while len(out) < n:
        batch = pool[:]
        rng.shuffle(batch)
        out.extend(batch[: n - len(out)])
    return out
