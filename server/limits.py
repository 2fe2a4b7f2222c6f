"""What a Generate request may ask for, and how many a caller may run at once.

`parse_generate_request` turns a `GenerateRequest` into a `GenerationInput` (chat
messages + validated `SamplingOptions`) or raises `InvalidRequest` with a message a
person understands; the servicer maps it to INVALID_ARGUMENT. The prompt's token count
is checked after the chat template is applied (`check_prompt_tokens`), since that is
what the policy sees.

Proto3 zero values keep the contract's meaning: n = 0 means 1 and max_new_tokens = 0
means the server default, so the smallest rejected n is 10 (with max_n = 9).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from rlhf.v1 import inference_pb2
from server.config import RequestLimits
from server.engines.base import SamplingOptions

CHAT_ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """The request breaks a documented limit; the message says which and what is allowed."""


class TooManyRequests(Exception):
    """The caller already runs as many generations as it may."""


@dataclass(frozen=True)
class GenerationInput:
    """A validated request: the conversation the policy sees and how to sample it.

    `prompt_text` is the plain prompt, or the last user turn of a chat (what the store
    logs as the prompt's text); `is_chat` tells whether `messages` came from the caller.
    """

    messages: list[dict[str, str]]
    prompt_text: str
    is_chat: bool
    options: SamplingOptions


def parse_generate_request(
    request: inference_pb2.GenerateRequest, limits: RequestLimits
) -> GenerationInput:
    """Check every field of `request` against `limits`; raise InvalidRequest on the first problem."""
    check_request_id(request.request_id, limits)
    messages, prompt_text, is_chat = _parse_input(request, limits)
    return GenerationInput(messages, prompt_text, is_chat, parse_sampling(request.params, limits))


def check_request_id(request_id: str, limits: RequestLimits) -> None:
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequest(
            f"request_id is {len(request_id)} characters; at most {limits.max_request_id_chars} allowed"
        )


def _parse_input(
    request: inference_pb2.GenerateRequest, limits: RequestLimits
) -> tuple[list[dict[str, str]], str, bool]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("set either prompt or messages: the request has neither")
    if kind == "prompt":
        text = request.prompt
        if not text.strip():
            raise InvalidRequest("prompt is empty")
        _check_chars(len(text), limits)
        return [{"role": "user", "content": text}], text, False
    messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
    _check_messages(messages, limits)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return messages, last_user, True


def _check_messages(messages: list[dict[str, str]], limits: RequestLimits) -> None:
    if not messages:
        raise InvalidRequest("messages is empty: a conversation needs at least one turn")
    for i, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role is {message['role']!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise InvalidRequest("messages has no non-empty user turn: the prompt is empty")
    _check_chars(sum(len(m["content"]) for m in messages), limits)


def _check_chars(chars: int, limits: RequestLimits) -> None:
    if chars > limits.max_prompt_chars:
        raise InvalidRequest(
            f"prompt too long: {chars} characters; at most {limits.max_prompt_chars} allowed"
        )


def check_prompt_tokens(prompt_tokens: int, limits: RequestLimits) -> None:
    """The prompt as the policy sees it (chat template applied) must fit the limit."""
    if prompt_tokens > limits.max_prompt_tokens:
        raise InvalidRequest(
            f"prompt too long: {prompt_tokens} tokens with the chat template; "
            f"at most {limits.max_prompt_tokens} allowed"
        )


def parse_sampling(params: inference_pb2.SamplingParams, limits: RequestLimits) -> SamplingOptions:
    """Fill the proto's defaults (0 / unset) and check ranges; see the contract's comments."""
    n = params.n or 1
    if not 1 <= n <= limits.max_n:
        raise InvalidRequest(f"n must be in 1..{limits.max_n} (0 means 1), got {params.n}")
    max_new = params.max_new_tokens or limits.default_max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise InvalidRequest(
            f"max_new_tokens must be in 1..{limits.max_new_tokens_limit} (0 means "
            f"{limits.default_max_new_tokens}), got {params.max_new_tokens}"
        )
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and 0 <= temperature <= limits.max_temperature):
        raise InvalidRequest(
            f"temperature must be in [0, {limits.max_temperature:g}] (0 is greedy), got {temperature:g}"
        )
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p:g}")
    return SamplingOptions(
        n=n, max_new_tokens=max_new, temperature=float(temperature), top_p=float(top_p),
        seed=params.seed if params.HasField("seed") else None,
        stop=_parse_stop(list(params.stop), limits),
    )


def _parse_stop(stop: list[str], limits: RequestLimits) -> tuple[str, ...]:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"too many stop strings: {len(stop)}; at most {limits.max_stop_strings} allowed"
        )
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequest(f"stop[{i}] is empty; a stop string needs at least one character")
        if len(s) > limits.max_stop_chars:
            raise InvalidRequest(
                f"stop[{i}] is {len(s)} characters; at most {limits.max_stop_chars} allowed"
            )
    return tuple(stop)


class ConcurrencyLimiter:
    """Counts in-flight generations per caller key and refuses one over `limit`.

    Used from the event loop only (no lock needed): acquire and release never await.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"concurrency limit must be >= 1, got {limit}")
        self.limit = limit
        self._in_flight: Counter[str] = Counter()

    def in_flight(self, key: str | None = None) -> int:
        """Generations in flight for `key`, or for all keys together."""
        return sum(self._in_flight.values()) if key is None else self._in_flight[key]

    @contextlib.contextmanager
    def slot(self, key: str) -> Iterator[None]:
        """Hold one of `key`'s slots for the block; TooManyRequests when none is free."""
        if self._in_flight[key] >= self.limit:
            raise TooManyRequests(
                f"too many concurrent requests for this API key: {self.limit} already in "
                "flight; wait for one to finish"
            )
        self._in_flight[key] += 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
