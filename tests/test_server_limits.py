"""Request limits and the server config, without a server: defaults, ranges, messages."""

from __future__ import annotations

import math

import pytest

from clients.client import generate_request
from server.config import RequestLimits, ServerConfig
from server.engines.base import SamplingOptions
from server.limits import (
    ConcurrencyLimiter,
    InvalidRequest,
    TooManyRequests,
    check_prompt_tokens,
    parse_generate_request,
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
