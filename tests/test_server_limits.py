"""Request limits and the server config, without a server: defaults, ranges, messages."""

from __future__ import annotations

import math

import pytest

from clients.client import generate_request
from server.config import RequestLimits, ServerConfig
from server.engines.base import SamplingOptions
from server.limits import (
    ConcurrencyLimiter,
    GenerationBudget,
    InvalidRequest,
    KeyedBuckets,
    RateLimited,
    RequestRateLimiter,
    TokenBucket,
    TooManyRequests,
    check_prompt_tokens,
    parse_generate_request,
    refill,
    retry_at,
    wait_seconds,
)

LIMITS = RequestLimits()


def test_unset_fields_take_the_contract_defaults() -> None:
    parsed = parse_generate_request(generate_request("hi"), LIMITS)
    # n 0 -> 1, max_new_tokens 0 -> the server default, temperature and top_p unset -> 1.0.
    assert parsed.options == SamplingOptions(n=1, max_new_tokens=128, temperature=1.0, top_p=1.0)
    assert (parsed.messages, parsed.prompt_text, parsed.is_chat) == ([{"role": "user", "content": "hi"}], "hi", False)


def test_explicit_fields_are_kept() -> None:
    request = generate_request("hi", n=9, max_new_tokens=512, temperature=0.0, top_p=0.5, seed=2**64 - 1,
                               stop=["a"] * 8)
    options = parse_generate_request(request, LIMITS).options
    assert (options.n, options.max_new_tokens, options.temperature, options.top_p) == (9, 512, 0.0, 0.5)
    assert (options.seed, options.stop) == (2**64 - 1, ("a",) * 8)


def test_a_chat_logs_its_last_user_turn() -> None:
    request = generate_request(messages=[("system", "s"), ("user", "first"), ("assistant", "a"), ("user", "last")])
    parsed = parse_generate_request(request, LIMITS)
    assert parsed.is_chat and parsed.prompt_text == "last" and len(parsed.messages) == 4


@pytest.mark.parametrize(("request_", "message"), [
    (generate_request("   "), "prompt is empty"),
    (generate_request(messages=[]), "messages is empty"),
    (generate_request(messages=[("robot", "hi")]), "messages[0].role is 'robot'"),
    (generate_request(messages=[("system", "only a system turn")]), "no non-empty user turn"),
    (generate_request("x" * 65537), "prompt too long: 65537 characters"),
    (generate_request("hi", n=10), "n must be in 1..9 (0 means 1), got 10"),
    (generate_request("hi", max_new_tokens=513), "max_new_tokens must be in 1..512"),
    (generate_request("hi", temperature=-0.01), "temperature must be in [0, 2]"),
    (generate_request("hi", temperature=math.nan), "temperature must be in [0, 2]"),
    (generate_request("hi", top_p=0.0), "top_p must be in (0, 1], got 0"),
    (generate_request("hi", top_p=1.01), "top_p must be in (0, 1]"),
    (generate_request("hi", stop=["."] * 9), "too many stop strings: 9; at most 8"),
    (generate_request("hi", stop=[""]), "stop[0] is empty"),
    (generate_request("hi", stop=["x" * 257]), "stop[0] is 257 characters"),
    (generate_request("hi", request_id="r" * 129), "request_id is 129 characters"),
])
def test_bad_requests_say_what_is_wrong(request_, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InvalidRequest) as caught:
        parse_generate_request(request_, LIMITS)
    assert message in str(caught.value)


def test_neither_prompt_nor_messages() -> None:
    from rlhf.v1 import inference_pb2

    with pytest.raises(InvalidRequest, match="set either prompt or messages"):
        parse_generate_request(inference_pb2.GenerateRequest(), LIMITS)


def test_prompt_tokens_are_checked_after_the_chat_template() -> None:
    check_prompt_tokens(1024, LIMITS)
    with pytest.raises(InvalidRequest, match="1025 tokens with the chat template; at most 1024"):
        check_prompt_tokens(1025, LIMITS)


def test_concurrency_limiter_counts_per_key_and_frees_slots() -> None:
    limiter = ConcurrencyLimiter(2)
    with limiter.slot("a"), limiter.slot("a"), limiter.slot("b"):
        assert (limiter.in_flight("a"), limiter.in_flight()) == (2, 3)
        with pytest.raises(TooManyRequests, match="2 already in flight"):
            with limiter.slot("a"):
                pass
    assert limiter.in_flight() == 0
    with pytest.raises(RuntimeError), limiter.slot("a"):  # a failing block frees its slot too
        raise RuntimeError
    assert limiter.in_flight("a") == 0


@pytest.mark.parametrize(("changes", "message"), [
    ({"engine": "tpu"}, "Unknown engine: 'tpu'"),
    ({"tls_cert": "cert.pem"}, "TLS needs both"),
    ({"port": 70000}, "ports must lie in 0..65535"),
    ({"max_concurrent_per_key": 0}, "max_concurrent_per_key must be >= 1"),
    ({"grace_seconds": -1}, "grace_seconds must be >= 0"),
    ({"label_k": 10}, "label_k must lie in 4..9"),
    ({"label_k": 3}, "label_k must lie in 4..9"),
    ({"label_overlap_share": 1.5}, "label_overlap_share must lie in 0..1, got 1.5"),
    ({"label_gold_share": -0.1}, "label_gold_share must lie in 0..1"),
    ({"label_gold_min_agreement": 2}, "label_gold_min_agreement must lie in 0..1"),
    ({"label_overlap_labelers": 1}, "label_overlap_labelers must lie in 2..5, got 1"),
    ({"label_overlap_labelers": 6}, "label_overlap_labelers must lie in 2..5"),
    ({"label_gold_min_tasks": 0}, "label_gold_min_tasks must be >= 1"),
    ({"requests_per_second": -1}, "requests_per_second and tokens_per_minute must be >= 0"),
    ({"request_burst": 0}, "request_burst must be >= 1"),
    # 512 x 9 = 4608 tokens: the largest request would never fit a smaller bucket.
    ({"token_burst": 4607}, "token_burst (4607) must hold the largest request: 4608 tokens"),
])
def test_server_config_is_validated(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig(**changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_n": 10}, "max_n must be <= 9"),
    ({"default_max_new_tokens": 600}, "default_max_new_tokens (600) must lie in 1..max_new_tokens_limit (512)"),
    ({"max_prompt_tokens": 0}, "max_prompt_tokens must be >= 1"),
])
def test_request_limits_are_validated(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        RequestLimits(**changes)
    assert message in str(caught.value)


def test_serve_flags_cover_every_config_field() -> None:
    from server.app import parse_args

    config, engine_options = parse_args(["--port", "0", "--max-n", "4", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                                         "--engine-option", "max_batch_size=4", "--engine-option", "dtype=bfloat16"])
    assert (config.port, config.limits.max_n, config.tls) == (0, 4, True)
    assert engine_options == {"max_batch_size": 4, "dtype": "bfloat16"}


def test_the_rate_limits_are_generous_by_default_and_can_be_switched_off() -> None:
    config = ServerConfig()
    assert (config.requests_per_second, config.request_burst) == (500.0, 1000)
    assert (config.tokens_per_minute, config.token_burst) == (600_000.0, 65_536)
    assert config.metrics_host == "127.0.0.1"  # loopback, whatever `host` is
    ServerConfig(requests_per_second=0, request_burst=0, tokens_per_minute=0, token_burst=0)  # off: no bound checked
    from server.app import parse_args

    config, _ = parse_args(["--requests-per-second", "5", "--request-burst", "10", "--tokens-per-minute", "1200",
                            "--token-burst", "5000", "--metrics-host", "0.0.0.0"])
    assert (config.requests_per_second, config.request_burst, config.tokens_per_minute, config.token_burst,
            config.metrics_host) == (5.0, 10, 1200.0, 5000, "0.0.0.0")  # fmt: skip


# ---------------------------------------------------------------- token buckets (hand-worked values)


def test_refill_adds_rate_times_elapsed_up_to_the_burst() -> None:
    assert refill(2.0, 1.5, rate=4.0, burst=10.0) == 8.0  # 2 + 4 * 1.5
    assert refill(8.0, 1.0, rate=4.0, burst=10.0) == 10.0  # 8 + 4 = 12, capped at 10
    assert refill(3.0, -5.0, rate=4.0, burst=10.0) == 3.0  # a clock that stepped back adds nothing


def test_wait_seconds_is_the_missing_tokens_over_the_rate() -> None:
    assert wait_seconds(5.0, 5.0, rate=2.0) == 0.0
    assert wait_seconds(1.0, 4.0, rate=2.0) == 1.5  # (4 - 1) / 2


def test_a_bucket_admits_its_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(1, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst: 3 at once
    assert bucket.take(1, now=0.0) == 0.5  # empty: 1 token at 2/s is 0.5 s away; nothing taken
    # 0.5 tokens there after 0.25 s: 0.5 more is 0.25 s away, but the first refused caller was
    # told 0.5; this one comes after it, when 1 more token has come: 0.5 + 1 / 2 = 1.0, in 0.75 s.
    assert bucket.take(1, now=0.25) == 0.75
    assert bucket.take(1, now=0.5) == 0.0  # 1.0 there: taken, level 0
    assert bucket.level == 0.0


def test_refused_callers_are_told_successive_times_not_the_same_instant() -> None:
    assert retry_at(10.0, 0.5, promised_until=0.0, cost=1, rate=2.0) == 10.5  # nobody waiting: now + wait
    assert retry_at(10.0, 0.5, promised_until=10.5, cost=1, rate=2.0) == 11.0  # behind 10.5, 1 token later
    assert retry_at(10.0, 3.0, promised_until=10.5, cost=1, rate=2.0) == 13.0  # its own wait is longer
    bucket = TokenBucket(rate=2.0, burst=1.0, now=0.0)
    assert bucket.take(1, now=0.0) == 0.0
    assert [bucket.take(1, now=0.0) for _ in range(3)] == [0.5, 1.0, 1.5]  # one token per 0.5 s each
    assert bucket.take(1, now=5.0) == 0.0  # refilled; the promises are past
    assert bucket.take(1, now=5.0) == 0.5


def test_a_refund_fills_the_bucket_but_never_above_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=100.0, now=0.0)
    assert bucket.take(90, now=0.0) == 0.0  # level 10
    assert bucket.take(40, now=1.0) == 2.0  # level 10 + 10 = 20: 20 more at 10/s is 2 s away
    bucket.give(70, now=1.0)  # 90 reserved, 20 used: 70 back -> 20 + 70 = 90
    assert bucket.level == 90.0
    bucket.give(70, now=1.0)
    assert bucket.level == 100.0  # capped


def test_keyed_buckets_are_per_key_and_drop_full_ones() -> None:
    now = [0.0]
    buckets = KeyedBuckets(rate=1.0, burst=2.0, clock=lambda: now[0], max_keys=2)
    assert [buckets.take("a", 1) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert buckets.take("b", 2) == 0.0  # another key: its own full bucket
    now[0] = 10.0  # both refilled: full again, so a third key drops them
    assert buckets.take("c", 1) == 0.0
    assert buckets.level("a") == 2.0 and buckets.level("c") == 1.0


def test_the_request_rate_says_when_to_retry() -> None:
    now = [0.0]
    rate = RequestRateLimiter(per_second=4, burst=2, clock=lambda: now[0])
    rate.admit("key:1")
    rate.admit("key:1")
    with pytest.raises(RateLimited) as caught:
        rate.admit("key:1")
    assert caught.value.retry_after_s == 0.25  # 1 request at 4/s
    assert "may start 4 requests per second (burst 2); retry in 0.250 s" in str(caught.value)
    rate.admit("key:2")  # another key is unaffected
    now[0] = 0.25
    rate.admit("key:1")


def test_a_generation_reserves_max_tokens_and_gets_the_unused_part_back() -> None:
    now = [0.0]
    tokens = KeyedBuckets(rate=10.0, burst=100.0, clock=lambda: now[0])
    budget = GenerationBudget(ConcurrencyLimiter(2), tokens)
    with budget.hold("k", 64) as charge:  # 64 reserved: level 36
        assert tokens.level("k") == 36.0 and budget.concurrency.in_flight("k") == 1
        with pytest.raises(RateLimited) as caught:
            with budget.hold("k", 64):
                pass
        assert caught.value.retry_after_s == 2.8  # (64 - 36) / 10
        assert "this request reserves 64" in str(caught.value)
        charge.used = 24
    assert tokens.level("k") == 76.0  # 36 + (64 - 24) refunded
    assert budget.concurrency.in_flight("k") == 0  # a refused hold took no slot either
    with pytest.raises(RuntimeError), budget.hold("k", 50):
        raise RuntimeError  # a failed generation that produced nothing is refunded whole
    assert tokens.level("k") == 76.0


def test_no_free_slot_refuses_before_any_token_is_reserved() -> None:
    tokens = KeyedBuckets(rate=1.0, burst=100.0, clock=lambda: 0.0)
    budget = GenerationBudget(ConcurrencyLimiter(1), tokens)
    with budget.hold("k", 10), pytest.raises(TooManyRequests, match="1 already in flight"):
        with budget.hold("k", 10):
            pass
    assert tokens.level("k") == 100.0
