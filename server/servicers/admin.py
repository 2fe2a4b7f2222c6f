"""rlhf.v1.Admin: policies and training cycles, for role admin only.

Every call, allowed or refused, is written to the audit table (who, what, the outcome)
before it is answered. SwapPolicy, Rollback and TriggerCycle honour request_id: a retry
with the same id and request returns the first answer; with another request,
ALREADY_EXISTS.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from common.store import (
    audit,
    create_cycle,
    get_cycle,
    list_cycles,
    list_policies,
    lookup_idempotent,
    record_idempotent,
    run_idempotent,
    stats,
)
from common.store.errors import ConflictError, NotFoundError
from rlhf.v1 import admin_pb2, admin_pb2_grpc
from server.auth import Caller, require_role
from server.policies import SwapOutcome
from server.servicers import ServerDeps, convert, payload_sha256, status_for

M = TypeVar("M", bound=Message)
DEFAULT_CYCLES_LIMIT = 50


def swap_response(outcome: SwapOutcome) -> admin_pb2.SwapPolicyResponse:
    return admin_pb2.SwapPolicyResponse(
        previous_version=outcome.previous_version, version=outcome.version,
        stall_seconds=outcome.stall_seconds, total_seconds=outcome.total_seconds)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Operator calls: list and swap policies, trigger and inspect cycles, stats."""

    def __init__(self, deps: ServerDeps) -> None:
        self._engine = deps.engine
        self._store = deps.store
        self._switcher = deps.switcher
        self._auth = deps.auth

    async def ListPolicies(self, request: admin_pb2.ListPoliciesRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ListPoliciesResponse:
        async with self._admin_call(context, "ListPolicies", {"limit": request.limit}):
            policies = await self._store.read(list_policies(request.limit))
            return admin_pb2.ListPoliciesResponse(policies=[convert.policy(p) for p in policies])

    async def SwapPolicy(self, request: admin_pb2.SwapPolicyRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.SwapPolicyResponse:
        detail: dict[str, Any] = {"version": request.version, "request_id": request.request_id}
        async with self._admin_call(context, "SwapPolicy", detail) as caller:
            return await self._idempotent(caller, "SwapPolicy", request, admin_pb2.SwapPolicyResponse,
                                          lambda: self._swap(self._switcher.swap(request.version), detail))

    async def Rollback(self, request: admin_pb2.RollbackRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.SwapPolicyResponse:
        version = request.version if request.HasField("version") else None
        detail: dict[str, Any] = {"version": version, "request_id": request.request_id}
        async with self._admin_call(context, "Rollback", detail) as caller:
            return await self._idempotent(caller, "Rollback", request, admin_pb2.SwapPolicyResponse,
                                          lambda: self._swap(self._switcher.rollback(version), detail))

    async def TriggerCycle(self, request: admin_pb2.TriggerCycleRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.TriggerCycleResponse:
        detail: dict[str, Any] = {"reason": request.reason, "request_id": request.request_id}
        async with self._admin_call(context, "TriggerCycle", detail) as caller:
            queue = create_cycle("admin", request.reason, base_version=self._engine.version)

            def work(db: Any) -> bytes:
                cycle = queue(db)
                detail["cycle_id"] = cycle.id
                return admin_pb2.TriggerCycleResponse(
                    cycle_id=cycle.id, state=convert.CYCLE_STATES[cycle.state]).SerializeToString()

            if not request.request_id:
                return admin_pb2.TriggerCycleResponse.FromString(await self._store.write(work))
            outcome = await self._store.write(run_idempotent(
                caller.user_id, "rlhf.v1.Admin/TriggerCycle", request.request_id, payload_sha256(request), work))
            return admin_pb2.TriggerCycleResponse.FromString(outcome.response)

    async def GetCycle(self, request: admin_pb2.GetCycleRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.Cycle:
        async with self._admin_call(context, "GetCycle", {"cycle_id": request.cycle_id}):
            cycle = await self._store.read(get_cycle(request.cycle_id))
            if cycle is None:
                raise NotFoundError(f"cycle {request.cycle_id} not found")
            return convert.cycle(cycle)

    async def ListCycles(self, request: admin_pb2.ListCyclesRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListCyclesResponse:
        async with self._admin_call(context, "ListCycles", {"limit": request.limit}):
            cycles = await self._store.read(list_cycles(request.limit or DEFAULT_CYCLES_LIMIT))
            return admin_pb2.ListCyclesResponse(cycles=[convert.cycle(c) for c in cycles])

    async def GetStats(self, request: admin_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.Stats:
        async with self._admin_call(context, "GetStats", {}):
            return convert.stats(await self._store.read(stats()), self._engine.version)

    # ------------------------------------------------------------ helpers

    @contextlib.asynccontextmanager
    async def _admin_call(self, context: grpc.aio.ServicerContext, action: str,
                          detail: dict[str, Any]) -> AsyncIterator[Caller]:
        """Require role admin; audit the call with its outcome; map errors to statuses."""
        caller: Caller | None = None
        try:
            caller = await self._auth.identify(context)
            require_role(caller, "admin")  # after identify: a refused caller is audited by name
            yield caller
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - audited, then answered with its status
            code, message = status_for(error)
            await self._audit(caller, action, detail, f"{code.name}: {message}")
            await context.abort(code, message)
        else:
            await self._audit(caller, action, detail, "OK")

    async def _audit(self, caller: Caller | None, action: str, detail: dict[str, Any], outcome: str) -> None:
        user_id = caller.user_id if caller else None
        await self._store.write(audit(user_id, f"admin.{action}", {**detail, "outcome": outcome}))

    async def _idempotent(self, caller: Caller, method: str, request: Message, response_type: type[M],
                          work: Callable[[], Awaitable[M]]) -> M:
        """Run `work` once per (caller, request_id): replay a recorded answer, record a new one."""
        if not request.request_id:  # type: ignore[attr-defined]
            return await work()
        name, request_id, digest = f"rlhf.v1.Admin/{method}", request.request_id, payload_sha256(request)  # type: ignore[attr-defined]
        recorded = await self._store.read(lookup_idempotent(caller.user_id, name, request_id))
        if recorded is not None:
            if recorded.payload_sha256 != digest:
                raise ConflictError(f"request_id {request_id!r} was already used with a different request")
            return response_type.FromString(recorded.response)
        response = await work()
        await self._store.write(record_idempotent(caller.user_id, name, request_id, digest,
                                                  response.SerializeToString()))
        return response

    @staticmethod
    async def _swap(swap: Awaitable[SwapOutcome], detail: dict[str, Any]) -> admin_pb2.SwapPolicyResponse:
        outcome = await swap
        detail.update(previous_version=outcome.previous_version, version=outcome.version,
                      stall_seconds=round(outcome.stall_seconds, 4),
                      total_seconds=round(outcome.total_seconds, 4),
                      drain_seconds=round(outcome.drain_seconds, 4),
                      load_seconds=round(outcome.load_seconds, 4),
                      verify_seconds=round(outcome.verify_seconds, 4))
        return swap_response(outcome)
