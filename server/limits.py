"""What a Generate request may ask for, and how much a caller may run: at once, per second
and in generated tokens.

`parse_generate_request` turns a `GenerateRequest` into a `GenerationInput` (chat
messages + validated `SamplingOptions`) or raises `InvalidRequest` with a message a
person understands; the servicer maps it to INVALID_ARGUMENT. The prompt's token count
is checked after the chat template is applied (`check_prompt_tokens`), since that is
what the policy sees.

Proto3 zero values keep the contract's meaning: n = 0 means 1 and max_new_tokens = 0
means the server default, so the smallest rejected n is 10 (with max_n = 9).

Per API key (`Caller.limit_key`), in this process's memory: `RequestRateLimiter` (every
authenticated RPC, charged by `server.auth`) and `GenerationBudget` (generations in flight
and generated tokens, for served requests and labeling samples alike). A generation
reserves max_new_tokens x n tokens up front and gets back what it did not generate when
it ends. Refusals are RESOURCE_EXHAUSTED; a rate or token refusal (`RateLimited`) says
when to retry, in its message and in the trailing metadata `retry-after-ms`; refused
callers of one key are told successive times (`retry_at`), not all the same instant.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
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


# ---------------------------------------------------------------- per-key rate and token budgets
#
# Token buckets (one per API key): a bucket holds at most `burst` tokens and refills at
# `rate` tokens per second; a call that costs c is admitted when c tokens are there, and
# takes them. The state lives in this process's memory (one server process per store), so
# a restart refills every bucket.


class RateLimited(TooManyRequests):
    """Over a per-key rate or token budget; `retry_after_s` is when to try again, behind the
    key's earlier refused calls (`retry_at`); answered RESOURCE_EXHAUSTED with `retry-after-ms`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry in {retry_after_s:.3f} s")
        self.reason, self.retry_after_s = message, retry_after_s

    def answered_later(self, seconds: float) -> RateLimited:
        """The same refusal answered `seconds` later: its retry time is that much nearer."""
        return RateLimited(self.reason, max(self.retry_after_s - seconds, 0.0))


def refill(level: float, elapsed_s: float, *, rate: float, burst: float) -> float:
    """The bucket's level `elapsed_s` later: level + rate * elapsed, capped at burst."""
    return min(burst, level + rate * max(0.0, elapsed_s))


def wait_seconds(level: float, cost: float, *, rate: float) -> float:
    """Seconds until a bucket at `level` holds `cost`: 0 when it does, else (cost - level) / rate."""
    return 0.0 if level >= cost else (cost - level) / rate


def retry_at(now: float, wait: float, promised_until: float, cost: float, *, rate: float) -> float:
    """When a refused caller should come back: when the bucket holds its cost, but behind the
    callers already told to come back, each of whom the bucket refills for in turn:
    max(now + wait, promised_until + cost / rate). Without the queue every refused caller
    would be told the same instant and all come back at once, to be refused again. A
    promise already past (`promised_until <= now`) holds nobody back."""
    if promised_until <= now:
        return now + wait
    return max(now + wait, promised_until + cost / rate)


class TokenBucket:
    """One bucket: starts full; `take` admits a cost or says how long to wait; `give` refunds."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"a token bucket needs rate > 0 and burst > 0, got {rate} and {burst}")
        self.rate, self.burst = rate, burst
        self.level, self._at = burst, now
        self._promised_until = now  # the latest retry time handed out (see `retry_at`)

    def _refill(self, now: float) -> None:
        self.level = refill(self.level, now - self._at, rate=self.rate, burst=self.burst)
        self._at = max(self._at, now)

    def take(self, cost: float, now: float) -> float:
        """Take `cost` and return 0.0, or take nothing and return the seconds to wait (queued
        behind earlier refusals: `retry_at`)."""
        self._refill(now)
        wait = wait_seconds(self.level, cost, rate=self.rate)
        if wait == 0.0:
            self.level -= cost
            return 0.0
        self._promised_until = retry_at(now, wait, self._promised_until, cost, rate=self.rate)
        return self._promised_until - now

    def give(self, amount: float, now: float) -> None:
        """Put `amount` back (an unused reservation), never above the burst."""
        self._refill(now)
        self.level = min(self.burst, self.level + amount)

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.level >= self.burst


class KeyedBuckets:
    """A `TokenBucket` per caller key, made full on first use. Event loop only (no lock).

    A full bucket is the same as a new one, so when more than `max_keys` are held the full
    ones are dropped: memory follows the keys active within about burst / rate seconds."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:  # fmt: skip
        TokenBucket(rate, burst, 0.0)  # validates
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, cost: float) -> float:
        """`TokenBucket.take` on `key`'s bucket."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.is_full(now)}
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(cost, now)

    def give(self, key: str, amount: float) -> None:
        """`TokenBucket.give` on `key`'s bucket (a dropped bucket was full: nothing to do)."""
        bucket = self._buckets.get(key)
        if bucket is not None and amount > 0:
            bucket.give(amount, self._clock())

    def level(self, key: str) -> float:
        """Tokens in `key`'s bucket now (the burst for a key never seen)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        bucket.is_full(self._clock())
        return bucket.level


class RequestRateLimiter:
    """Requests per second per key, with a burst: every authenticated RPC costs 1."""

    def __init__(self, per_second: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = KeyedBuckets(per_second, burst, clock=clock)

    def admit(self, key: str) -> None:
        """Count one request against `key`; RateLimited when its bucket is empty."""
        wait = self.buckets.take(key, 1)
        if wait > 0:
            raise RateLimited(
                f"request rate limit: this API key may start {self.buckets.rate:g} requests per second "
                f"(burst {self.buckets.burst:g})", wait)


@dataclass
class TokenCharge:
    """A generation's reservation: `charged` up front (max_new_tokens * n); set `used` to the
    tokens generated, and the rest is refunded when the generation ends."""

    charged: int
    used: int = 0


class GenerationBudget:
    """What a key may generate: generations in flight (`ConcurrencyLimiter`) and, when
    `tokens` is given, generated tokens per unit of time. Serving (Inference) and labeling
    samples (Feedback's lease) both go through `hold`."""

    def __init__(self, concurrency: ConcurrencyLimiter, tokens: KeyedBuckets | None = None) -> None:
        self.concurrency = concurrency
        self.tokens = tokens

    @contextlib.contextmanager
    def hold(self, key: str, max_tokens: int) -> Iterator[TokenCharge]:
        """A concurrency slot and a reservation of `max_tokens` for the block; the unused
        part (`charged - used`) is refunded at its end. TooManyRequests (no free slot) or
        RateLimited (the token bucket holds less than `max_tokens`) before the block runs."""
        with self.concurrency.slot(key):
            charge = TokenCharge(max_tokens if self.tokens is not None else 0)
            if self.tokens is not None:
                wait = self.tokens.take(key, max_tokens)
                if wait > 0:
                    raise RateLimited(
                        f"token budget: this API key may generate {self.tokens.rate * 60:g} tokens per minute "
                        f"(burst {self.tokens.burst:g}); this request reserves {max_tokens} "
                        "(max_new_tokens x n, the unused part is refunded when it ends)", wait)
            try:
                yield charge
            finally:
                if self.tokens is not None:
                    self.tokens.give(key, charge.charged - min(charge.used, charge.charged))
