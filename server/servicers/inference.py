"""rlhf.v1.Inference: Generate, GenerateStream, GetModel (role user or higher).

Translation only: the request is checked by `server.limits`, run and logged by
`server.generation.Sampler`, and its domain events become proto messages here.

Idempotency: a non-empty request_id makes Generate (and GenerateStream, under the same
key) retry-safe. The answer is recorded with the request's last logged sample; a retry
with the same id and the same request replays it (a stream replays one event per
sample, its whole text and completion); the same id with a different request is
refused with ALREADY_EXISTS. Concurrent calls with one id run one generation: the
second waits for the first and replays its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from common.checkpoints import CheckpointError, read_manifest
from common.store import Completion, new_id, serving_policy
from rlhf.v1 import inference_pb2, inference_pb2_grpc
from server.auth import Caller
from server.generation import SampleDone, SampleEvent
from server.limits import GenerationInput, parse_generate_request
from server.logging_sink import IdempotencyKey, PromptRecord, ResponseBuilder
from server.servicers import KeyedLocks, ServerDeps, convert, payload_sha256, require_ready, rpc_errors

GENERATE_METHOD = "rlhf.v1.Inference/Generate"


def generate_response(prompt_id: str, completions: list[Completion]) -> inference_pb2.GenerateResponse:
    ordered = sorted(completions, key=lambda c: c.idx)
    return inference_pb2.GenerateResponse(
        prompt_id=prompt_id,
        completions=[convert.completion(c) for c in ordered],
        policy_version=ordered[0].policy_version if ordered else -1,
    )


def stream_event(prompt_id: str, event: SampleEvent) -> inference_pb2.GenerateStreamResponse:
    message = inference_pb2.GenerateStreamResponse(
        prompt_id=prompt_id, index=event.index, text_delta=event.text_delta,
        policy_version=event.policy_version)
    if isinstance(event, SampleDone):
        message.completion.CopyFrom(convert.completion(event.completion))
    return message


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Serves the current policy to users; every prompt and sample is logged."""

    def __init__(self, deps: ServerDeps) -> None:
        self._engine = deps.engine
        self._sampler = deps.sampler
        self._log = deps.completion_log
        self._store = deps.store
        self._auth = deps.auth
        self._limits = deps.config.limits
        self._ready = deps.engine_ready
        self._request_ids = KeyedLocks()
        self._model_names: dict[str, str] = {}

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        started = time.perf_counter()
        async with rpc_errors(context):
            caller, generation, key = await self._admit(request, context)
            async with self._once(key):
                if key is not None and (replayed := await self._log.replay(key)) is not None:
                    return inference_pb2.GenerateResponse.FromString(replayed)
                prompt = self._prompt(caller, generation, request.request_id)
                events = self._sampler.run(caller, generation, prompt, started=started,
                                           answer=self._answer(key, prompt))
                async with contextlib.aclosing(events):
                    done = [event.completion async for event in events if isinstance(event, SampleDone)]
                return generate_response(prompt.prompt_id, done)

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        started = time.perf_counter()
        async with rpc_errors(context):
            caller, generation, key = await self._admit(request, context)
            async with self._once(key):
                if key is not None and (replayed := await self._log.replay(key)) is not None:
                    for message in _replay_as_stream(inference_pb2.GenerateResponse.FromString(replayed)):
                        yield message
                    return
                prompt = self._prompt(caller, generation, request.request_id)
                events = self._sampler.run(caller, generation, prompt, started=started,
                                           answer=self._answer(key, prompt))
                async with contextlib.aclosing(events):
                    async for event in events:
                        yield stream_event(prompt.prompt_id, event)

    async def GetModel(
        self, request: inference_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelInfo:
        async with rpc_errors(context):
            await self._auth.authorize(context, "user")
            require_ready(self._ready)
            version = self._engine.version
            policy = await self._store.read(serving_policy())
            info = inference_pb2.ModelInfo(
                policy_version=version, engine=self._engine.name,
                model_name=await self._model_name(policy.path if policy else None),
                max_prompt_tokens=self._limits.max_prompt_tokens,
                max_new_tokens_limit=self._limits.max_new_tokens_limit, max_n=self._limits.max_n)
            if policy is not None and policy.version == version and policy.serving_since is not None:
                info.serving_since.CopyFrom(convert.timestamp(policy.serving_since))
            return info

    # ------------------------------------------------------------ helpers

    async def _admit(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Caller, GenerationInput, IdempotencyKey | None]:
        """Authenticate, check readiness and the request; the idempotency key if any."""
        caller = await self._auth.authorize(context, "user")
        require_ready(self._ready)
        generation = parse_generate_request(request, self._limits)
        key = None
        if request.request_id:
            key = IdempotencyKey(caller.user_id, GENERATE_METHOD, request.request_id, payload_sha256(request))
        return caller, generation, key

    def _once(self, key: IdempotencyKey | None) -> contextlib.AbstractAsyncContextManager[None]:
        """Serialize calls sharing a request_id (the second then replays the first)."""
        if key is None:
            return contextlib.nullcontext()
        return self._request_ids.hold((key.caller_id, key.request_id))

    @staticmethod
    def _prompt(caller: Caller, generation: GenerationInput, request_id: str) -> PromptRecord:
        return PromptRecord(
            prompt_id=new_id(), user_id=caller.user_id, text=generation.prompt_text,
            messages=generation.messages if generation.is_chat else None,
            request_id=request_id or None)

    @staticmethod
    def _answer(key: IdempotencyKey | None, prompt: PromptRecord) -> tuple[IdempotencyKey, ResponseBuilder] | None:
        """What records the answer of an idempotent request (None without a request_id)."""
        if key is None:
            return None
        return key, lambda completions: generate_response(prompt.prompt_id, completions).SerializeToString()

    async def _model_name(self, checkpoint: str | None) -> str:
        """The base model named in the serving checkpoint's manifest (cached per folder)."""
        if checkpoint is None:
            return self._engine.model_name
        if checkpoint not in self._model_names:
            try:
                manifest = await asyncio.to_thread(read_manifest, Path(checkpoint))
                self._model_names[checkpoint] = manifest.base_model
            except CheckpointError:
                return self._engine.model_name
        return self._model_names[checkpoint]


def _replay_as_stream(response: inference_pb2.GenerateResponse) -> list[inference_pb2.GenerateStreamResponse]:
    """A recorded answer as a stream: one final event per sample, carrying its whole text."""
    return [
        inference_pb2.GenerateStreamResponse(
            prompt_id=response.prompt_id, index=c.index, text_delta=c.text, completion=c,
            policy_version=c.policy_version)
        for c in response.completions
    ]
