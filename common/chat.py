"""The chat template, applied in ONE way by the server (what the policy is asked) and the
trainer (what the policy is trained and scored on), so the two see the same token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Mapping


def render_chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of the chat-templated `messages`, ending with the assistant header (the
    generation prompt). `tokenizer` is a transformers tokenizer (typed loosely: common/
    does not import transformers)."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # a BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)
