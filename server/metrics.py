"""Prometheus metrics of the server, on their own HTTP port (`ServerConfig.metrics_port`).

The endpoint binds `metrics_host`, loopback by default whatever address gRPC binds (it
has no authentication: a scraper on another machine needs `--metrics-host`), and speaks
HTTPS with the server's certificate when TLS is on.

`ServerMetrics` owns a private registry (two servers in one test process never share
counters). `MetricsInterceptor` counts every RPC by method and status code and times
it, for every service, including ones registered later (Feedback). Generation-level
figures (time to first token, tokens, in-flight generations) and swaps are recorded by
the servicers through the `ServerMetrics` methods.

Labeler quality gauges are set whenever Admin.GetLabelerQuality runs (they show that
call's figures until the next one; a labeler or group without a figure has no series):
`rlhf_labeler_pairwise_agreement{labeler}` (agreement with the other labelers on shared
completion sets), `rlhf_labeler_gold_agreement{labeler}` (with the gold rankings),
`rlhf_labelers_flagged` and `rlhf_labeler_group_alpha{group}` (Krippendorff's alpha,
ordinal; group="" is all labelers together).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Seconds: generation on CPU spans milliseconds (TTFT of a tiny model) to a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class ServerMetrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rlhf_grpc_requests", "RPCs answered, by method and status code",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("rlhf_grpc_request_seconds", "RPC latency, first byte in to status out",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("rlhf_time_to_first_token_seconds",
                                      "Seconds from a generation's start to its first token",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("rlhf_generation_seconds", "Seconds per generation (all n samples)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("rlhf_generated_tokens", "Tokens generated, all samples",
                                        registry=r)
        self.tokens_per_second = Histogram("rlhf_generation_tokens_per_second",
                                           "Generated tokens per second of one generation (all samples)",
                                           buckets=TOKENS_PER_SECOND_BUCKETS, registry=r)
        self.inflight = Gauge("rlhf_inflight_generations", "Generations admitted and not finished (queue depth)",
                              registry=r)
        self.serving_version = Gauge("rlhf_serving_policy_version", "The policy version serving now",
                                     registry=r)
        self.swaps = Counter("rlhf_policy_swaps", "Policy swaps, by result (ok | refused | failed)",
                             ["result"], registry=r)
        self.swap_stall_seconds = Histogram("rlhf_swap_stall_seconds",
                                            "Seconds new requests waited during a swap (drain + load)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.labeler_pairwise = Gauge("rlhf_labeler_pairwise_agreement",
                                      "Share of strict pairs on shared completion sets where the labeler agrees "
                                      "with the other labelers (as of the last GetLabelerQuality)",
                                      ["labeler"], registry=r)
        self.labeler_gold = Gauge("rlhf_labeler_gold_agreement",
                                  "Share of the gold rankings' strict pairs the labeler ordered the same way",
                                  ["labeler"], registry=r)
        self.labelers_flagged = Gauge("rlhf_labelers_flagged", "Labelers below the gold agreement threshold",
                                      registry=r)
        self.group_alpha = Gauge("rlhf_labeler_group_alpha",
                                 "Krippendorff's alpha (ordinal) of a labeler group on shared completion sets; "
                                 'group="" is all labelers', ["group"], registry=r)
        self._http: Any = None

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Count a generation as in flight for the block."""
        self.inflight.inc()
        try:
            yield
        finally:
            self.inflight.dec()

    def record_generation(self, seconds: float, ttft: float | None, tokens: int) -> None:
        self.generation_seconds.observe(seconds)
        if ttft is not None:
            self.ttft_seconds.observe(ttft)
        self.generated_tokens.inc(tokens)
        if tokens and seconds > 0:
            self.tokens_per_second.observe(tokens / seconds)

    def record_swap(self, result: str, stall_seconds: float | None = None) -> None:
        self.swaps.labels(result=result).inc()
        if stall_seconds is not None:
            self.swap_stall_seconds.observe(stall_seconds)

    def record_labeler_quality(self, *, pairwise: Mapping[str, float | None], gold: Mapping[str, float | None],
                               flagged: int, group_alpha: Mapping[str, float | None]) -> None:
        """Replace the labeler quality gauges with one GetLabelerQuality's figures (None: no series)."""
        for gauge, values, label in ((self.labeler_pairwise, pairwise, "labeler"), (self.labeler_gold, gold, "labeler"),
                                     (self.group_alpha, group_alpha, "group")):  # fmt: skip
            gauge.clear()  # an erased labeler or a group gone must not linger
            for name, value in values.items():
                if value is not None:
                    gauge.labels(**{label: name}).set(value)
        self.labelers_flagged.set(flagged)

    def serve_http(self, host: str, port: int, *, certfile: Path | None = None, keyfile: Path | None = None) -> None:
        """Expose /metrics on host:port (0: do nothing); HTTPS with `certfile`/`keyfile` (the
        server's TLS certificate when TLS is on)."""
        if port:
            tls = {"certfile": str(certfile), "keyfile": str(keyfile)} if certfile and keyfile else {}
            self._http, _ = start_http_server(port, addr=host, registry=self.registry, **tls)  # type: ignore[arg-type]
            log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _status_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC by its full method name and final status code."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream),
            handler.request_deserializer, handler.response_serializer)

    def _observe(self, method: str, context: grpc.aio.ServicerContext,
                 error: BaseException | None, start: float) -> None:
        code = _status_of(context, error)
        self._metrics.requests.labels(method=method, code=code.name).inc()
        self._metrics.request_seconds.labels(method=method).observe(time.perf_counter() - start)

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start, error = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                self._observe(method, context, error, start)

        return wrapped

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, error = time.perf_counter(), None
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    # aclosing: when gRPC closes this wrapper (a cancelled call), the
                    # servicer's generator must close too, or its engine work runs on.
                    async with contextlib.aclosing(result) as items:
                        async for item in items:
                            yield item
                else:  # a coroutine that writes with context.write()
                    await result
            except BaseException as e:
                error = e
                raise
            finally:
                self._observe(method, context, error, start)

        return wrapped
