"""rlhf.v1.Admin: policies, training cycles and users' data, for role admin only, except
SetTrainingOptOut, which every role may call on its own user id.

Every call, allowed or refused, is written to the audit table (who, what, the outcome)
before it is answered; EraseUser's entries name the erased user only by sha256. An
accepted mutation (`MUTATIONS`) gets its row from `common.store.run_mutation` /
`commit_mutation`, in the same transaction as the change (a swap's: with the new serving
status), so no mutation commits without it; a replayed answer writes no row, and neither
does a call refused by the per-key request rate (the metrics count those). SwapPolicy,
Rollback, TriggerCycle, EraseUser and SetTrainingOptOut honour request_id: a retry with the
same id and request returns the first answer; with another request, ALREADY_EXISTS.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from common.identity import Role
from common.store import (
    InvalidArgumentError,
    audit,
    create_cycle,
    erase_user,
    get_cycle,
    list_cycles,
    list_policies,
    Mutation,
    Op,
    commit_mutation,
    replay_mutation,
    run_mutation,
    set_train_opt_out,
    stats,
    user_id_sha256,
)
from common.store.errors import NotFoundError
from rlhf.v1 import admin_pb2, admin_pb2_grpc
from server.auth import AuthError, Caller, require_role
from server.limits import RateLimited
from server.policies import SwapOutcome
from server.servicers import KeyedLocks, ServerDeps, convert, payload_sha256, status_for, trailing_metadata_for

SERVICE = "rlhf.v1.Admin"
DEFAULT_CYCLES_LIMIT = 50
# Their accepted calls are audited by `common.store.run_mutation` / `commit_mutation`, in
# the mutation's own transaction; `_admin_call` audits the other calls and every refusal.
MUTATIONS = frozenset({"SwapPolicy", "Rollback", "TriggerCycle", "EraseUser", "SetTrainingOptOut"})


def swap_response(outcome: SwapOutcome) -> admin_pb2.SwapPolicyResponse:
    return admin_pb2.SwapPolicyResponse(
        previous_version=outcome.previous_version, version=outcome.version,
        stall_seconds=outcome.stall_seconds, total_seconds=outcome.total_seconds)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Operator calls: list and swap policies, trigger and inspect cycles, stats, erase users
    and set their training opt-outs (the one call open to every role, on its own user id)."""

    def __init__(self, deps: ServerDeps) -> None:
        self._engine = deps.engine
        self._store = deps.store
        self._switcher = deps.switcher
        self._auth = deps.auth
        self._request_ids = KeyedLocks()

    async def ListPolicies(self, request: admin_pb2.ListPoliciesRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ListPoliciesResponse:
        async with self._admin_call(context, "ListPolicies", {"limit": request.limit}):
            policies = await self._store.read(list_policies(request.limit))
            return admin_pb2.ListPoliciesResponse(policies=[convert.policy(p) for p in policies])

    async def SwapPolicy(self, request: admin_pb2.SwapPolicyRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.SwapPolicyResponse:
        detail: dict[str, Any] = {"version": request.version, "request_id": request.request_id}
        async with self._admin_call(context, "SwapPolicy", detail) as caller:
            return await self._swap_once(caller, "SwapPolicy", request, detail,
                                         lambda record: self._switcher.swap(request.version, record))

    async def Rollback(self, request: admin_pb2.RollbackRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.SwapPolicyResponse:
        version = request.version if request.HasField("version") else None
        detail: dict[str, Any] = {"version": version, "request_id": request.request_id}
        async with self._admin_call(context, "Rollback", detail) as caller:
            return await self._swap_once(caller, "Rollback", request, detail,
                                         lambda record: self._switcher.rollback(version, record))

    async def TriggerCycle(self, request: admin_pb2.TriggerCycleRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.TriggerCycleResponse:
        detail: dict[str, Any] = {"reason": request.reason, "request_id": request.request_id}
        async with self._admin_call(context, "TriggerCycle", detail) as caller:
            queue = create_cycle("admin", request.reason, base_version=self._engine.version)

            def work(db: Any) -> bytes:
                cycle = queue(db)
                return admin_pb2.TriggerCycleResponse(
                    cycle_id=cycle.id, state=convert.CYCLE_STATES[cycle.state]).SerializeToString()

            return admin_pb2.TriggerCycleResponse.FromString(await self._idempotent_write(
                caller, "TriggerCycle", request, work, detail,
                lambda answer: {"cycle_id": admin_pb2.TriggerCycleResponse.FromString(answer).cycle_id}))

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

    async def EraseUser(self, request: admin_pb2.EraseUserRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.EraseUserResponse:
        # The audit must not name the erased user: only the hash of the id goes in `detail`.
        detail: dict[str, Any] = {"user_id_sha256": user_id_sha256(request.user_id) if request.user_id else "",
                                  "request_id": request.request_id}
        async with self._admin_call(context, "EraseUser", detail) as caller:
            if not request.user_id:
                raise InvalidArgumentError("user_id is empty: name the user to erase")
            if request.user_id == caller.user_id:
                raise InvalidArgumentError("an admin cannot erase itself (its own calls are audited under "
                                           "its id): ask another admin")
            erase = erase_user(request.user_id, erased_by=caller.user_id)
            answer = await self._idempotent_write(
                caller, "EraseUser", request, lambda db: convert.erasure(erase(db)).SerializeToString(), detail,
                lambda answer: _erasure_counts(admin_pb2.EraseUserResponse.FromString(answer)))
            self._auth.forget_user(request.user_id)
            return admin_pb2.EraseUserResponse.FromString(answer)

    async def SetTrainingOptOut(self, request: admin_pb2.SetTrainingOptOutRequest,
                                context: grpc.aio.ServicerContext) -> admin_pb2.SetTrainingOptOutResponse:
        detail: dict[str, Any] = {"user_id": request.user_id, "train_opt_out": request.train_opt_out,
                                  "request_id": request.request_id}
        async with self._admin_call(context, "SetTrainingOptOut", detail, minimum="user") as caller:
            if not request.user_id:
                raise InvalidArgumentError("user_id is empty: name the user whose setting changes (your own id)")
            own = request.user_id == caller.user_id
            if not own and caller.identity.role != "admin":
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                                f"role {caller.identity.role!r} may set only its own training opt-out "
                                f"(user_id {caller.user_id!r}); another user's needs role 'admin'")
            # A caller naming itself may lack a users row (open mode): it gets one.
            change = set_train_opt_out(request.user_id, request.train_opt_out, create=own)

            def work(db: Any) -> bytes:
                return admin_pb2.SetTrainingOptOutResponse(
                    train_opt_out=request.train_opt_out, changed=change(db)).SerializeToString()

            return admin_pb2.SetTrainingOptOutResponse.FromString(await self._idempotent_write(
                caller, "SetTrainingOptOut", request, work, detail,
                lambda answer: {"changed": admin_pb2.SetTrainingOptOutResponse.FromString(answer).changed}))

    # ------------------------------------------------------------ helpers

    @contextlib.asynccontextmanager
    async def _admin_call(self, context: grpc.aio.ServicerContext, action: str,
                          detail: dict[str, Any], minimum: Role = "admin") -> AsyncIterator[Caller]:
        """Require role `minimum` (admin unless told); audit the call with its outcome; map
        errors to statuses."""
        caller: Caller | None = None
        try:
            caller = await self._auth.identify(context)
            require_role(caller, minimum)  # after identify: a refused caller is audited by name
            yield caller
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - audited, then answered with its status
            code, message = status_for(error)
            if not isinstance(error, RateLimited):  # a flood must not become one store write per refusal
                await self._audit(caller, action, detail, f"{code.name}: {message}")
            await context.abort(code, message, trailing_metadata=trailing_metadata_for(error))
        else:
            if action not in MUTATIONS:  # a mutation's row was committed with it (a replay writes none)
                await self._audit(caller, action, detail, "OK")

    async def _audit(self, caller: Caller | None, action: str, detail: dict[str, Any], outcome: str) -> None:
        user_id = caller.user_id if caller else None
        await self._store.write(audit(user_id, f"admin.{action}", {**detail, "outcome": outcome}))

    def _mutation(self, caller: Caller, method: str, request: Message, detail: dict[str, Any]) -> Mutation:
        """The store's view of an Admin mutation: who (user, role), the method, the ids."""
        ids = {k: v for k, v in detail.items() if k != "request_id"}
        return Mutation(caller.user_id, caller.identity.role, f"admin.{method}", f"{SERVICE}/{method}",
                        request.request_id, payload_sha256(request), ids)  # type: ignore[attr-defined]  # fmt: skip

    async def _swap_once(self, caller: Caller, method: str, request: Message, detail: dict[str, Any],
                         swap: Callable[[Callable[[SwapOutcome], Op[bytes]]], Awaitable[SwapOutcome]],
                         ) -> admin_pb2.SwapPolicyResponse:  # fmt: skip
        """Swap once per (caller, request_id): replay a recorded answer, or swap and commit
        the answer and the audit row in the same transaction as the new serving status."""
        mutation = self._mutation(caller, method, request, detail)
        hold = self._request_ids.hold((caller.user_id, method, mutation.request_id))
        async with hold if mutation.request_id else contextlib.nullcontext():
            replayed = await self._store.read(replay_mutation(mutation)) if mutation.request_id else None
            if replayed is not None:
                return admin_pb2.SwapPolicyResponse.FromString(replayed)

            def record(outcome: SwapOutcome) -> Op[bytes]:
                detail.update(_swap_detail(outcome))
                answer = swap_response(outcome).SerializeToString()
                return commit_mutation(self._mutation(caller, method, request, detail), lambda db: answer)

            return swap_response(await swap(record))

    async def _idempotent_write(self, caller: Caller, method: str, request: Message, work: Callable[[Any], bytes],
                                detail: dict[str, Any], result_ids: Callable[[bytes], dict[str, Any]] | None = None,
                                ) -> bytes:  # fmt: skip
        """Run the store op `work` (returning the serialized answer) once per (caller,
        request_id), committing its answer and audit row in the same transaction
        (`common.store.run_mutation`); without a request_id, every time."""
        outcome = await self._store.write(run_mutation(self._mutation(caller, method, request, detail), work,
                                                       result_ids=result_ids))  # fmt: skip
        return outcome.response


def _swap_detail(outcome: SwapOutcome) -> dict[str, Any]:
    return dict(previous_version=outcome.previous_version, version=outcome.version,
                stall_seconds=round(outcome.stall_seconds, 4), total_seconds=round(outcome.total_seconds, 4),
                drain_seconds=round(outcome.drain_seconds, 4), load_seconds=round(outcome.load_seconds, 4),
                verify_seconds=round(outcome.verify_seconds, 4))  # fmt: skip


def _erasure_counts(response: admin_pb2.EraseUserResponse) -> dict[str, Any]:
    return {"rows_deleted": dict(response.rows_deleted), "audit_rows_pseudonymised": response.audit_rows_pseudonymised}
