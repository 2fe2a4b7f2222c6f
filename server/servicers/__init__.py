"""gRPC servicers: they translate between protos and the domain, nothing more.

Every servicer takes ONE argument in `__init__`, the server's `ServerDeps` (engine, store,
sampler, config, ...), built once per server by `server.app.server_deps`, and keeps the
parts it uses. A service joins the server through a `ServiceRegistration` in
`server.app.SERVICES`: its full name (for health and reflection), its servicer class and
the generated `add_XServicer_to_server` that adds it to a `grpc.aio.Server`.

Domain errors become gRPC statuses in ONE place, `rpc_errors`:

| raised | status |
| --- | --- |
| `auth.AuthError` | its own code (UNAUTHENTICATED, PERMISSION_DENIED) |
| `limits.InvalidRequest`, `store.InvalidArgumentError` | INVALID_ARGUMENT |
| `limits.TooManyRequests` | RESOURCE_EXHAUSTED (`limits.RateLimited`: answered near its retry time, at most 1 s late, with trailing metadata `retry-after-ms`) |
| `policies.PolicyNotFound`, `store.NotFoundError` | NOT_FOUND |
| `store.TaskClosedError` (a labeling task expired, answered or not ready) | FAILED_PRECONDITION |
| `store.NotYourTaskError` (leased to another labeler) | PERMISSION_DENIED |
| `store.ConflictError` (any other) | ALREADY_EXISTS |
| `policies.SwapRefused` | FAILED_PRECONDITION |
| `NotReady` | UNAVAILABLE |
| `engines.EngineError`, anything else | INTERNAL (logged with its traceback) |
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from common.store import ConflictError, InvalidArgumentError, NotFoundError, NotYourTaskError, Store, TaskClosedError
from server.auth import Authenticator, AuthError
from server.engines.base import Engine, EngineError
from server.limits import InvalidRequest, RateLimited, TooManyRequests
from server.policies import PolicyNotFound, SwapRefused

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.generation import Sampler
    from server.limits import ConcurrencyLimiter, GenerationBudget
    from server.logging_sink import CompletionLog
    from server.metrics import ServerMetrics
    from server.policies import PolicySwitcher

log = logging.getLogger(__name__)


class NotReady(Exception):
    """The server is up but cannot answer this yet (the engine is loading) or any more
    (shutting down)."""


@dataclass(frozen=True)
class ServerDeps:
    """Everything a servicer may be given, built once per server (`server.app.server_deps`)."""

    config: ServerConfig
    engine: Engine
    store: Store
    auth: Authenticator
    sampler: Sampler
    limiter: ConcurrencyLimiter
    budget: GenerationBudget  # the limiter above and the per-key token buckets
    completion_log: CompletionLog
    switcher: PolicySwitcher
    metrics: ServerMetrics
    engine_ready: asyncio.Event  # set once the engine has loaded; cleared at shutdown


ServicerT = TypeVar("ServicerT")


@dataclass(frozen=True)
class ServiceRegistration(Generic[ServicerT]):
    """One gRPC service of the server."""

    name: str  # full service name, e.g. "rlhf.v1.Inference" (health status, reflection)
    servicer: Callable[[ServerDeps], ServicerT]  # the servicer class
    add_servicer: Callable[[ServicerT, grpc.aio.Server], None]  # the generated add_XServicer_to_server
    # False for a placeholder that answers UNIMPLEMENTED: its health stays NOT_SERVING.
    implemented: bool = True

    def add_to_server(self, deps: ServerDeps, server: grpc.aio.Server) -> None:
        """Build this service's servicer on `deps` and add it to `server`."""
        self.add_servicer(self.servicer(deps), server)


def require_ready(ready: asyncio.Event) -> None:
    if not ready.is_set():
        raise NotReady("the policy is not being served right now (loading or shutting down); retry shortly")


_STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (TooManyRequests, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PolicyNotFound, grpc.StatusCode.NOT_FOUND),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (TaskClosedError, grpc.StatusCode.FAILED_PRECONDITION),  # subclasses of ConflictError: before it
    (NotYourTaskError, grpc.StatusCode.PERMISSION_DENIED),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (SwapRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message that answer a domain error (see the module table)."""
    if isinstance(error, AuthError):
        return error.code, error.message
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code, str(error)
    if isinstance(error, EngineError):
        log.error("engine error: %s", error)
        return grpc.StatusCode.INTERNAL, f"engine error: {error}"
    log.exception("unexpected error in a servicer", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"


RETRY_AFTER_MS = "retry-after-ms"


def trailing_metadata_for(error: Exception) -> tuple[tuple[str, str], ...]:
    """`retry-after-ms: <milliseconds>` for a rate or token refusal, else nothing. (The
    standard `google.rpc.RetryInfo` detail needs grpcio-status, not a dependency here.)"""
    if isinstance(error, RateLimited):
        return ((RETRY_AFTER_MS, str(max(1, math.ceil(error.retry_after_s * 1000)))),)
    return ()


# A rate refusal is answered when its retry time is near, at most this late: a client that
# retries at once, ignoring the hint, then waits on a sleeping coroutine instead of spinning
# refusals that take the CPU every other key needs (bench.rate_limits measures both).
REFUSAL_HOLD_MAX_S = 1.0


async def hold_refusal(error: RateLimited) -> RateLimited:
    """Sleep until `error`'s retry time (at most REFUSAL_HOLD_MAX_S); the refusal as it then stands."""
    held = min(error.retry_after_s, REFUSAL_HOLD_MAX_S)
    await asyncio.sleep(held)
    return error.answered_later(held)


@contextlib.asynccontextmanager
async def rpc_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Answer a domain error raised in the block with its gRPC status (`status_for`).

    Cancellation and generator exits pass through untouched (they are BaseExceptions),
    and so does an abort already under way.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as error:  # noqa: BLE001 - mapped to a status, never swallowed
        if isinstance(error, RateLimited):
            error = await hold_refusal(error)
        code, message = status_for(error)
        await context.abort(code, message, trailing_metadata=trailing_metadata_for(error))


def payload_sha256(request: Message) -> str:
    """Hash of what a request asks for, its `request_id` field excluded (idempotency:
    the same id with another payload is refused)."""
    payload = type(request)()
    payload.CopyFrom(request)
    payload.ClearField("request_id")  # type: ignore[arg-type]
    return hashlib.sha256(payload.SerializeToString(deterministic=True)).hexdigest()


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it (serializes
    concurrent calls that share a request_id)."""

    def __init__(self) -> None:
        self._locks: dict[object, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: object) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
