"""The server, assembled in ONE function (`build_server`), and `rlhf serve`.

    store = Store(path)
    policy = await startup_policy(store, ...)          # serving version, or publish v0
    engine = create_engine(kind, policy.path, policy.version)
    running = await build_server(config, engine, store)
    await running.start()        # bound; health NOT_SERVING while the engine loads
    await running.load_engine()  # health SERVING
    await running.wait_closed()  # SIGTERM/SIGINT: drain for grace_seconds, then stop

Services are listed in `SERVICES`; adding one (the Feedback servicer) is one
`ServiceRegistration` there: its name, its servicer class (whose `__init__` takes the
`ServerDeps` that `server_deps` builds) and the generated `add_XServicer_to_server`.
Health (`grpc.health.v1.Health`) has a status per service and for the whole server (""),
and reflection lists every registered service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from common.checkpoints import CheckpointError
from common.store import Store, list_keys
from rlhf.v1 import admin_pb2, admin_pb2_grpc, feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc
from server.auth import Authenticator
from server.config import RequestLimits, ServerConfig, is_loopback
from server.engines.base import Engine, EngineError
from server.generation import Sampler
from server.limits import ConcurrencyLimiter, GenerationBudget, KeyedBuckets, RequestRateLimiter
from server.logging_sink import CompletionLog
from server.pii_ingest import PiiIngest
from server.metrics import MetricsInterceptor, ServerMetrics
from server.policies import PolicySwitcher, SwapRefused, startup_policy
from server.servicers import ServerDeps, ServiceRegistration
from server.servicers.admin import AdminServicer
from server.servicers.feedback import FeedbackServicer
from server.servicers.inference import InferenceServicer

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ENGINE_HEALTH_INTERVAL_S = 5.0


class OpenModeError(RuntimeError):
    """Refused: a store without API keys may only be served on loopback."""


def _service_name(module: Any, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name


INFERENCE = ServiceRegistration(_service_name(inference_pb2, "Inference"), InferenceServicer,
                                inference_pb2_grpc.add_InferenceServicer_to_server)
ADMIN = ServiceRegistration(_service_name(admin_pb2, "Admin"), AdminServicer,
                            admin_pb2_grpc.add_AdminServicer_to_server)
FEEDBACK = ServiceRegistration(_service_name(feedback_pb2, "Feedback"), FeedbackServicer,
                               feedback_pb2_grpc.add_FeedbackServicer_to_server)
SERVICES: list[ServiceRegistration[Any]] = [INFERENCE, ADMIN, FEEDBACK]


class RunningServer:
    """A bound server and what it owns; made by `build_server`."""

    def __init__(self, server: grpc.aio.Server, deps: ServerDeps, health: health_aio.HealthServicer,
                 services: Sequence[ServiceRegistration[Any]], port: int) -> None:
        self.server = server
        self.deps = deps
        self.health = health
        self.services = list(services)
        self.port = port
        self._stop_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        """host:port a client on this machine dials."""
        host = self.deps.config.host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Accept connections; every service reports NOT_SERVING until `load_engine`."""
        await self._set_health(NOT_SERVING)
        await self.server.start()
        config = self.deps.config
        self.deps.metrics.serve_http(config.metrics_host, config.metrics_port,
                                     certfile=config.tls_cert, keyfile=config.tls_key)
        log.info("listening on %s (%s)", self.target, "TLS" if self.deps.config.tls else "plaintext")

    async def load_engine(self) -> None:
        """Load the policy into the engine, then report SERVING."""
        engine = self.deps.engine
        await engine.start()
        if self._stop_task is not None:  # stopped (a signal) while loading: undo the start
            await engine.shutdown()
            return
        self.deps.metrics.serving_version.set(engine.version)
        self.deps.engine_ready.set()
        await self._set_health(SERVING)
        self._watchdog = asyncio.create_task(self._watch_engine(), name="engine-health")
        log.info("serving policy v%d with the %s engine", engine.version, engine.name)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight ones finish for
        `grace` seconds (default: the config's), cancel the rest, then stop the engine.
        Idempotent; concurrent callers share one stop."""
        if self._stop_task is None:
            grace = self.deps.config.grace_seconds if grace is None else grace
            self._stop_task = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        log.info("stopping: draining in-flight requests for up to %.1f s", grace)
        await self.health.enter_graceful_shutdown()
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.server.stop(grace)
        self.deps.engine_ready.clear()
        await self.deps.completion_log.drain()
        await self.deps.engine.shutdown()
        self.deps.metrics.stop_http()
        log.info("stopped")

    async def wait_closed(self) -> None:
        """Return once the server has stopped (a signal or `stop`)."""
        await self.server.wait_for_termination()
        if self._stop_task is not None:
            await self._stop_task

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: graceful stop; a second signal cuts the grace period short."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        if self._stop_task is None:
            log.info("%s received", signal.Signals(signum).name)
            asyncio.ensure_future(self.stop())
        else:
            log.warning("%s received again: stopping now", signal.Signals(signum).name)
            asyncio.ensure_future(self.server.stop(0))

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        for service in self.services:
            await self.health.set(service.name, status if service.implemented else NOT_SERVING)

    async def _watch_engine(self) -> None:
        """Report NOT_SERVING while the engine says it is unhealthy."""
        healthy = True
        while True:
            await asyncio.sleep(ENGINE_HEALTH_INTERVAL_S)
            now_healthy = await self.deps.engine.check_health()
            if now_healthy != healthy:
                log.warning("engine is %s", "healthy again" if now_healthy else "UNHEALTHY")
                await self._set_health(SERVING if now_healthy else NOT_SERVING)
                healthy = now_healthy


async def build_server(
    config: ServerConfig,
    engine: Engine,
    store: Store,
    *,
    services: Sequence[ServiceRegistration[Any]] = SERVICES,
    handle_signals: bool = False,
) -> RunningServer:
    """Assemble the server: servicers on `engine` and `store`, health, reflection, metrics,
    request limits, TLS, and (with `handle_signals`) SIGTERM/SIGINT → graceful stop.

    The engine may still be unstarted (`RunningServer.load_engine` starts it). Raises
    OpenModeError when the store has no API keys and the bind address is not loopback.
    """
    await _check_open_mode(config, store)
    deps = server_deps(config, engine, store)
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(deps.metrics)],
        options=[("grpc.max_receive_message_length", config.max_receive_message_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    for service in services:
        service.add_to_server(deps, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [s.name for s in services] + [_service_name(health_pb2, "Health"), reflection.SERVICE_NAME], server)
    running = RunningServer(server, deps, health, services, _bind(server, config))
    if handle_signals:
        running.install_signal_handlers()
    return running


def server_deps(config: ServerConfig, engine: Engine, store: Store) -> ServerDeps:
    """What the servicers share, built once per server from its config, engine and store.

    `engine_ready` starts clear: `RunningServer.load_engine` sets it. A test or bench that
    serves a servicer on its own builds its deps here too, and sets it once its engine runs."""
    metrics = ServerMetrics()
    completion_log = CompletionLog(store, PiiIngest(config.pii_ingest, config.pii_phone_region))
    limiter = ConcurrencyLimiter(config.max_concurrent_per_key)
    tokens = KeyedBuckets(config.tokens_per_minute / 60, config.token_burst) if config.tokens_per_minute else None
    budget = GenerationBudget(limiter, tokens)
    request_rate = (RequestRateLimiter(config.requests_per_second, config.request_burst)
                    if config.requests_per_second else None)  # fmt: skip
    return ServerDeps(
        config=config, engine=engine, store=store,
        auth=Authenticator(store, cache_seconds=config.key_cache_seconds, request_rate=request_rate),
        sampler=Sampler(engine, completion_log, metrics, config.limits, budget), limiter=limiter, budget=budget,
        completion_log=completion_log, switcher=PolicySwitcher(engine, store, metrics),
        metrics=metrics, engine_ready=asyncio.Event())


async def _check_open_mode(config: ServerConfig, store: Store) -> None:
    if await store.read(list_keys()):
        return
    if not is_loopback(config.host):
        raise OpenModeError(
            f"refusing to bind {config.address}: the store {store.path} holds no API keys, so the "
            "server would answer anyone unauthenticated. Create a key first "
            "(`rlhf keys create --role admin --user you`) or bind a loopback address (127.0.0.1).")
    log.warning("OPEN MODE: the store has no API keys; every caller on this machine acts with "
                "all roles (name yourself with `x-user-id` metadata). Create a key to switch it off.")


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Bind the configured address, with TLS when configured; return the port."""
    if config.tls:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])  # type: ignore[arg-type]
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise RuntimeError(f"could not bind {config.address}")
    return port


# ---------------------------------------------------------------- rlhf serve


async def serve(config: ServerConfig, engine_options: dict[str, Any] | None = None) -> None:
    """Run the server until SIGTERM/SIGINT: open the store, pick the policy, start the engine."""
    from server.engines import create_engine, default_engine_kind

    store = Store(config.store_path)
    try:
        policy = await startup_policy(store, config.checkpoints_root, config.base_model_dir,
                                      config.base_model_name)
        kind = default_engine_kind() if config.engine == "auto" else config.engine
        engine = create_engine(kind, Path(policy.path), policy.version, swap_mode=config.swap_mode,
                               drain_timeout_s=config.swap_drain_timeout_s, **(engine_options or {}))
        running = await build_server(config, engine, store, handle_signals=True)
        await running.start()
        try:
            await running.load_engine()
        except BaseException:
            await running.stop(0)
            raise
        await running.wait_closed()
    finally:
        store.close()


def _add_fields(parser: argparse.ArgumentParser, owner: Any, skip: set[str]) -> None:
    """One --flag per dataclass field, typed by its default, with the field's help text."""
    for f in dataclasses.fields(owner):
        if f.name in skip:
            continue
        default = getattr(owner, f.name)
        kind = Path if default is None or isinstance(default, Path) else type(default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                            help=f"{f.metadata.get('help', '')} (default: {default})")


def _engine_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key = key.replace("-", "_")
    # A boolean as a word: vLLM would take the string "false" as true.
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return key, parse(value)
    return key, value


def parse_args(argv: Sequence[str]) -> tuple[ServerConfig, dict[str, Any]]:
    """`rlhf serve` flags → (ServerConfig, engine options)."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="rlhf serve", description="Run the rlhf-loop gRPC server.")
    _add_fields(parser, defaults, skip={"limits"})
    limits = parser.add_argument_group("request limits")
    _add_fields(limits, defaults.limits, skip=set())  # type: ignore[arg-type]
    parser.add_argument("--engine-option", action="append", type=_engine_option, default=[],
                        metavar="KEY=VALUE", help="passed to the engine (e.g. max_batch_size=8, dtype=bfloat16)")
    args = vars(parser.parse_args(list(argv)))
    engine_options = dict(args.pop("engine_option"))
    limit_names = {f.name for f in dataclasses.fields(RequestLimits)}
    request_limits = RequestLimits(**{k: args.pop(k) for k in limit_names})
    return ServerConfig(**args, limits=request_limits), engine_options


def main(argv: Sequence[str] | None = None) -> int:
    """`rlhf serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, engine_options = parse_args(sys.argv[1:] if argv is None else argv)
        asyncio.run(serve(config, engine_options))
    except (OpenModeError, SwapRefused, EngineError, ValueError) as e:
        print(f"rlhf serve: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"rlhf serve: {e} (the embedded base model is made by `make model`)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
