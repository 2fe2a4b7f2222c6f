"""Python clients of the rlhf.v1 services, speaking only the generated stubs.

    with RlhfClient("127.0.0.1:50051", api_key=key) as client:
        reply = client.generate("What is the capital of France?", temperature=0)
        for event in client.generate_stream("Tell me a story", max_new_tokens=64):
            print(event.text_delta, end="")

    async with AsyncRlhfClient(target, api_key=key) as client:
        reply = await client.generate("hi")
        async for event in client.generate_stream("hi"): ...

The key travels as `authorization: Bearer <key>` metadata. TLS: pass `root_cert` (PEM
bytes or a file path) to trust a private CA or self-signed certificate, or `tls=True` for
the system roots. Against a server in open mode (no keys), `user_id` names the caller.
Errors are `grpc.RpcError` (sync) / `grpc.aio.AioRpcError` (async), with `.code()` and
`.details()`. Leaving a stream early (break, close) cancels the call, which aborts the
generation on the server.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.v1 import admin_pb2, admin_pb2_grpc, common_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
API_KEY_ENV = "RLHF_API_KEY"
TARGET_ENV = "RLHF_TARGET"

Message = Mapping[str, str] | tuple[str, str]


def sampling_params(
    n: int = 0, max_new_tokens: int = 0, temperature: float | None = None,
    top_p: float | None = None, seed: int | None = None, stop: Iterable[str] = (),
) -> common_pb2.SamplingParams:
    """SamplingParams; 0 / None leave a field to the server's default."""
    params = common_pb2.SamplingParams(n=n, max_new_tokens=max_new_tokens, stop=list(stop))
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    return params


def generate_request(
    prompt: str | None = None, *, messages: Iterable[Message] | None = None, request_id: str = "",
    **sampling: Any,
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest from a plain prompt or a conversation ((role, content) pairs or dicts)."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt and messages")
    request = inference_pb2.GenerateRequest(params=sampling_params(**sampling), request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    else:
        turns = [m if isinstance(m, tuple) else (m["role"], m["content"]) for m in messages or ()]
        request.messages.CopyFrom(common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in turns]))
    return request


def _credentials(root_cert: bytes | str | Path | None, tls: bool) -> grpc.ChannelCredentials | None:
    if root_cert is None and not tls:
        return None
    if isinstance(root_cert, (str, Path)):
        root_cert = Path(root_cert).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root_cert)


class _Base:
    """What both clients share: target, credentials, metadata."""

    def __init__(self, target: str | None = None, api_key: str | None = None, *,
                 root_cert: bytes | str | Path | None = None, tls: bool = False,
                 user_id: str | None = None, options: Iterable[tuple[str, Any]] = ()) -> None:
        self.target = target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
        self._metadata: list[tuple[str, str]] = []
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if api_key:
            self._metadata.append(("authorization", f"Bearer {api_key}"))
        if user_id:
            self._metadata.append(("x-user-id", user_id))
        self._credentials = _credentials(root_cert, tls)
        self._options = list(options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._metadata)


class RlhfClient(_Base):
    """Blocking client of Inference and Admin (and the standard health service); `feedback`
    is the Feedback stub, for labeling tools."""

    def __init__(self, target: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, api_key, **kwargs)
        if self._credentials is None:
            self.channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            self.channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RlhfClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ inference

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **kwargs: Any) -> inference_pb2.GenerateResponse:
        """Sample completions (see `generate_request` for the arguments)."""
        return self.inference.Generate(generate_request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                        **kwargs: Any) -> Iterator[inference_pb2.GenerateStreamResponse]:
        """Stream events as tokens are produced; leaving the loop early cancels the call."""
        call = self.inference.GenerateStream(generate_request(prompt, **kwargs), timeout=timeout,
                                             metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def get_model(self, timeout: float | None = None) -> inference_pb2.ModelInfo:
        return self.inference.GetModel(inference_pb2.GetModelRequest(), timeout=timeout, metadata=self.metadata)

    def health_status(self, service: str = "", timeout: float | None = None) -> int:
        """The health status (health_pb2.HealthCheckResponse.SERVING, ...) of one service."""
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def wait_until_serving(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Poll health until the server says SERVING (a starting server loads its engine first);
        TimeoutError after `timeout` s, RuntimeError as soon as `alive()` says the server's
        process is gone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("the server process exited before it was serving")
            try:
                if self.health_status(timeout=2) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.5)
        raise TimeoutError(f"the server was not serving after {timeout:.0f} s")

    # ------------------------------------------------------------ admin

    def list_policies(self, limit: int = 0, timeout: float | None = None) -> list[common_pb2.Policy]:
        return list(self.admin.ListPolicies(admin_pb2.ListPoliciesRequest(limit=limit), timeout=timeout,
                                            metadata=self.metadata).policies)

    def swap_policy(self, version: int, request_id: str = "",
                    timeout: float | None = None) -> admin_pb2.SwapPolicyResponse:
        return self.admin.SwapPolicy(admin_pb2.SwapPolicyRequest(version=version, request_id=request_id),
                                     timeout=timeout, metadata=self.metadata)

    def rollback(self, version: int | None = None, request_id: str = "",
                 timeout: float | None = None) -> admin_pb2.SwapPolicyResponse:
        return self.admin.Rollback(admin_pb2.RollbackRequest(version=version, request_id=request_id),
                                   timeout=timeout, metadata=self.metadata)

    def trigger_cycle(self, reason: str = "", request_id: str = "",
                      timeout: float | None = None) -> admin_pb2.TriggerCycleResponse:
        return self.admin.TriggerCycle(admin_pb2.TriggerCycleRequest(reason=reason, request_id=request_id),
                                       timeout=timeout, metadata=self.metadata)

    def get_cycle(self, cycle_id: int, timeout: float | None = None) -> admin_pb2.Cycle:
        return self.admin.GetCycle(admin_pb2.GetCycleRequest(cycle_id=cycle_id), timeout=timeout,
                                   metadata=self.metadata)

    def list_cycles(self, limit: int = 0, timeout: float | None = None) -> list[admin_pb2.Cycle]:
        return list(self.admin.ListCycles(admin_pb2.ListCyclesRequest(limit=limit), timeout=timeout,
                                          metadata=self.metadata).cycles)

    def get_stats(self, timeout: float | None = None) -> admin_pb2.Stats:
        return self.admin.GetStats(admin_pb2.GetStatsRequest(), timeout=timeout, metadata=self.metadata)

    def erase_user(self, user_id: str, request_id: str = "",
                   timeout: float | None = None) -> admin_pb2.EraseUserResponse:
        """Erase a user's data (irreversible; role admin)."""
        return self.admin.EraseUser(admin_pb2.EraseUserRequest(user_id=user_id, request_id=request_id),
                                    timeout=timeout, metadata=self.metadata)

    def set_training_opt_out(self, user_id: str, opt_out: bool = True, request_id: str = "",
                             timeout: float | None = None) -> admin_pb2.SetTrainingOptOutResponse:
        """Never train (or, with opt_out=False, train again) on a user's data: your own, or anyone's as admin."""
        request = admin_pb2.SetTrainingOptOutRequest(user_id=user_id, train_opt_out=opt_out, request_id=request_id)
        return self.admin.SetTrainingOptOut(request, timeout=timeout, metadata=self.metadata)


class AsyncRlhfClient(_Base):
    """asyncio client of Inference and Admin (and the standard health service); `feedback`
    is the Feedback stub (the web app passes each signed-in labeler's key as call metadata)."""

    def __init__(self, target: str | None = None, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, api_key, **kwargs)
        if self._credentials is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=self._options)
        else:
            self.channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncRlhfClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------ inference

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **kwargs: Any) -> inference_pb2.GenerateResponse:
        return await self.inference.Generate(generate_request(prompt, **kwargs), timeout=timeout,
                                             metadata=self.metadata)

    async def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                              **kwargs: Any) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        """Stream events; closing the iterator early (break + aclose) cancels the call."""
        call = self.inference.GenerateStream(generate_request(prompt, **kwargs), timeout=timeout,
                                             metadata=self.metadata)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def get_model(self, timeout: float | None = None) -> inference_pb2.ModelInfo:
        return await self.inference.GetModel(inference_pb2.GetModelRequest(), timeout=timeout,
                                             metadata=self.metadata)

    async def health_status(self, service: str = "", timeout: float | None = None) -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return response.status

    # ------------------------------------------------------------ admin

    async def list_policies(self, limit: int = 0, timeout: float | None = None) -> list[common_pb2.Policy]:
        response = await self.admin.ListPolicies(admin_pb2.ListPoliciesRequest(limit=limit), timeout=timeout,
                                                 metadata=self.metadata)
        return list(response.policies)

    async def swap_policy(self, version: int, request_id: str = "",
                          timeout: float | None = None) -> admin_pb2.SwapPolicyResponse:
        return await self.admin.SwapPolicy(admin_pb2.SwapPolicyRequest(version=version, request_id=request_id),
                                           timeout=timeout, metadata=self.metadata)

    async def rollback(self, version: int | None = None, request_id: str = "",
                       timeout: float | None = None) -> admin_pb2.SwapPolicyResponse:
        return await self.admin.Rollback(admin_pb2.RollbackRequest(version=version, request_id=request_id),
                                         timeout=timeout, metadata=self.metadata)

    async def trigger_cycle(self, reason: str = "", request_id: str = "",
                            timeout: float | None = None) -> admin_pb2.TriggerCycleResponse:
        return await self.admin.TriggerCycle(admin_pb2.TriggerCycleRequest(reason=reason, request_id=request_id),
                                             timeout=timeout, metadata=self.metadata)

    async def get_cycle(self, cycle_id: int, timeout: float | None = None) -> admin_pb2.Cycle:
        return await self.admin.GetCycle(admin_pb2.GetCycleRequest(cycle_id=cycle_id), timeout=timeout,
                                         metadata=self.metadata)

    async def list_cycles(self, limit: int = 0, timeout: float | None = None) -> list[admin_pb2.Cycle]:
        response = await self.admin.ListCycles(admin_pb2.ListCyclesRequest(limit=limit), timeout=timeout,
                                               metadata=self.metadata)
        return list(response.cycles)

    async def get_stats(self, timeout: float | None = None) -> admin_pb2.Stats:
        return await self.admin.GetStats(admin_pb2.GetStatsRequest(), timeout=timeout, metadata=self.metadata)

    async def erase_user(self, user_id: str, request_id: str = "",
                         timeout: float | None = None) -> admin_pb2.EraseUserResponse:
        return await self.admin.EraseUser(admin_pb2.EraseUserRequest(user_id=user_id, request_id=request_id),
                                          timeout=timeout, metadata=self.metadata)

    async def set_training_opt_out(self, user_id: str, opt_out: bool = True, request_id: str = "",
                                   timeout: float | None = None) -> admin_pb2.SetTrainingOptOutResponse:
        request = admin_pb2.SetTrainingOptOutRequest(user_id=user_id, train_opt_out=opt_out, request_id=request_id)
        return await self.admin.SetTrainingOptOut(request, timeout=timeout, metadata=self.metadata)
