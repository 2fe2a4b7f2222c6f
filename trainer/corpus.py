"""The pretraining text PPO-ptx mixes in, and the held-out slice that measures the alignment tax.

The embedded default ships ``trainer/corpus/*.txt``: about 100 KB of original plain English
prose written for this project and dedicated to the public domain (CC0; see
``trainer/corpus/README.md``). Any plain-text files can replace it by config.

A document is one paragraph (blocks separated by blank lines), so ``split_corpus`` can hold
out whole paragraphs. ``PtxBatcher`` packs the train slice into fixed-length token windows:
documents are tokenised, joined with a blank line, cut into windows of ``seq_len + 1``
tokens, and each window gives ``input_ids = w[:-1]`` and ``labels = w[1:]``, so the
logits of ``model(input_ids)`` at position t already line up with ``labels[:, t]`` (no
further shift before ``trainer.losses.ptx_loss``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CORPUS_DIR = Path(__file__).with_name("corpus")
DOCUMENT_SEPARATOR = "\n\n"


def shipped_corpus_files() -> list[Path]:
    """The corpus files shipped with the package, in a stable order."""
    return sorted(CORPUS_DIR.glob("*.txt"))


def split_documents(text: str) -> list[str]:
    """Paragraphs of a plain-text file (blank-line separated), whitespace-normalised."""
    blocks = re.split(r"\n\s*\n", text)
    return [" ".join(block.split()) for block in blocks if block.strip()]


def load_corpus(paths: Sequence[Path | str] | None = None) -> list[str]:
    """Documents (paragraphs) of plain-text files; default: the shipped corpus."""
    files = [Path(p) for p in paths] if paths is not None else shipped_corpus_files()
    if not files:
        raise FileNotFoundError(f"no corpus files (looked in {CORPUS_DIR})")
    documents: list[str] = []
    for path in files:
        documents += split_documents(path.read_text(encoding="utf-8"))
    if not documents:
        raise ValueError(f"the corpus files {[str(f) for f in files]} hold no text")
    return documents


def split_corpus(
    texts: Sequence[str], held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, held_out): a seeded random split of whole documents.

    The train slice feeds PPO-ptx batches; the held-out slice measures the alignment tax
    (``trainer.evaluate.ptx_eval_loss``). Both are non-empty when there are 2+ documents
    and ``0 < held_out_fraction < 1``.
    """
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_held = round(len(texts) * held_out_fraction)
    if held_out_fraction > 0 and len(texts) >= 2:
        n_held = min(max(n_held, 1), len(texts) - 1)
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [texts[i] for i in train], [texts[i] for i in held]


@dataclass
class PtxBatch:
    """Pretraining tokens. Shapes: all (B, T); ``labels`` are ``input_ids`` shifted by one,
    ``mask`` is 1 on real label tokens and 0 on padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> PtxBatch:
        return PtxBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                        self.mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows: slice) -> PtxBatch:
        """Some of the rows (``trainer.distributed.shard`` takes a rank's this way)."""
        return PtxBatch(self.input_ids[rows], self.attention_mask[rows], self.labels[rows], self.mask[rows])


class PtxBatcher:
    """An endless, seeded stream of (B, T) pretraining batches from the train slice.

    Each pass reshuffles the documents, re-packs them and cuts windows; a pass shorter
    than one window (a tiny corpus) gives one right-padded window.
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str], batch_size: int, seq_len: int, seed: int = 0) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not texts:
            raise ValueError("PtxBatcher needs at least one text")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                else tokenizer.eos_token_id)
        separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
        self._documents = [tokenizer(t, add_special_tokens=False)["input_ids"] + separator for t in texts]
        self._rng = random.Random(seed)
        self._windows = self._window_stream()

    def _window_stream(self) -> Iterator[list[int]]:
        """Windows of up to seq_len + 1 tokens, pass after pass (stride seq_len: every token is
        a label exactly once per pass)."""
        width = self.seq_len + 1
        while True:
            order = list(range(len(self._documents)))
            self._rng.shuffle(order)
            stream = [token for i in order for token in self._documents[i]]
            if len(stream) <= width:
                yield stream
                continue
            for start in range(0, len(stream) - width + 1, self.seq_len):
                yield stream[start : start + width]

    def next_batch(self) -> PtxBatch:
        windows = [next(self._windows) for _ in range(self.batch_size)]
        ids = torch.full((self.batch_size, self.seq_len + 1), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((self.batch_size, self.seq_len + 1), dtype=torch.float32)
        for i, window in enumerate(windows):
            ids[i, : len(window)] = torch.tensor(window, dtype=torch.long)
            valid[i, : len(window)] = 1.0
        return PtxBatch(
            input_ids=ids[:, :-1],  # (B, T)
            attention_mask=valid[:, :-1].long(),  # (B, T)
            labels=ids[:, 1:],  # (B, T): token t + 1 is predicted at position t
            mask=valid[:, 1:].clone(),  # (B, T)
        )

    def __iter__(self) -> Iterator[PtxBatch]:
        while True:
            yield self.next_batch()
