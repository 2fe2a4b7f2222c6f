"""rlhf.v1.Admin: policies, training cycles, users' data and labeler quality, for role
admin only, except SetTrainingOptOut, which every role may call on its own user id.

Every call, allowed or refused, is written to the audit table (who, what, the outcome)
before it is answered; EraseUser's entries name the erased user only by sha256. An
accepted mutation (`MUTATIONS`) gets its row from `common.store.run_mutation` /
`commit_mutation`, in the same transaction as the change (a swap's: with the new serving
status), so no mutation commits without it; a replayed answer writes no row, and neither
does a call refused by the per-key request rate (the metrics count those). SwapPolicy,
Rollback, TriggerCycle, EraseUser, SetTrainingOptOut and SetGoldRanking honour request_id:
a retry with the same id and request returns the first answer; with another request,
ALREADY_EXISTS.

Labeler quality. SetGoldRanking stores the operator's ranking of 4..9 of a prompt's logged
completions (SubmitRanking's rules), replacing an earlier one; labelers given a task over
exactly those completions are scored against it (the Feedback servicer hands out gold
tasks; the gold ranking itself trains nothing). GetLabelerQuality reads every ranking
labelers submitted (source 'label') and keys each by its completion set, (prompt id,
sorted completion ids): rankings with the same key ranked the same completions (a shared
prompt's, or a gold task's). Per labeler: rankings and declines, the median seconds from
shown_at to the ranking, agreement with the other labelers on shared sets and with gold
rankings (`common.agreement`), flagged below `label_gold_min_agreement` over at least
`label_gold_min_tasks` gold tasks; per labeler group and overall, pairwise agreement and
Krippendorff's alpha (ordinal). Each call also sets the Prometheus gauges
(`ServerMetrics.record_labeler_quality`). GetRatingsReport: the labelers' ratings per
policy version of the rated completion (mean Likert score, the share of each flag).
"""

from __future__ import annotations

import contextlib
import statistics
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from common.agreement import GroupFigures, LabeledRanking, LabelerFigures, group_figures, labeler_figures
from common.identity import Role
from common.store import (
    InvalidArgumentError,
    LabelerWork,
    audit,
    create_cycle,
    erase_user,
    get_cycle,
    labeler_work,
    list_cycles,
    list_policies,
    Mutation,
    Op,
    commit_mutation,
    replay_mutation,
    ratings_by_version,
    run_mutation,
    set_gold_ranking,
    set_train_opt_out,
    stats,
    user_id_sha256,
)
from common.store.errors import NotFoundError
from common.store.rankings import LABEL_MAX_K, LABEL_MIN_K, check_k, check_not_all_tied, check_ranking_shape, count_pairs
from rlhf.v1 import admin_pb2, admin_pb2_grpc
from server.auth import AuthError, Caller, require_role
from server.limits import RateLimited
from server.policies import SwapOutcome
from server.servicers import KeyedLocks, ServerDeps, convert, payload_sha256, status_for, trailing_metadata_for
from server.servicers.feedback import RATING_FLAGS

SERVICE = "rlhf.v1.Admin"
DEFAULT_CYCLES_LIMIT = 50
# Their accepted calls are audited by `common.store.run_mutation` / `commit_mutation`, in
# the mutation's own transaction; `_admin_call` audits the other calls and every refusal.
MUTATIONS = frozenset({"SwapPolicy", "Rollback", "TriggerCycle", "EraseUser", "SetTrainingOptOut", "SetGoldRanking"})


def swap_response(outcome: SwapOutcome) -> admin_pb2.SwapPolicyResponse:
    return admin_pb2.SwapPolicyResponse(
        previous_version=outcome.previous_version, version=outcome.version,
        stall_seconds=outcome.stall_seconds, total_seconds=outcome.total_seconds,
        swap_mode=outcome.swap_mode, continued_requests=outcome.continued_requests,
        aborted_requests=outcome.aborted_requests)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Operator calls: list and swap policies, trigger and inspect cycles, stats, erase users
    and set their training opt-outs (the one call open to every role, on its own user id)."""

    def __init__(self, deps: ServerDeps) -> None:
        self._engine = deps.engine
        self._store = deps.store
        self._switcher = deps.switcher
        self._auth = deps.auth
        self._metrics = deps.metrics
        self._config = deps.config
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

    async def SetGoldRanking(self, request: admin_pb2.SetGoldRankingRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.SetGoldRankingResponse:
        detail: dict[str, Any] = {"prompt_id": request.prompt_id, "request_id": request.request_id}
        async with self._admin_call(context, "SetGoldRanking", detail) as caller:
            if not request.prompt_id:
                raise InvalidArgumentError("prompt_id is empty: name the prompt whose completions are ranked")
            groups = [list(g.completion_ids) for g in request.ranking]
            check_ranking_shape(groups)  # before anything is looked up, as SubmitRanking does
            gold = set_gold_ranking(request.prompt_id, groups, caller.user_id, check_groups=_check_label_k_and_ties)

            def work(db: Any) -> bytes:
                stored, replaced = gold(db)
                return admin_pb2.SetGoldRankingResponse(prompt_id=stored.prompt_id, comparisons=count_pairs(groups),
                                                        replaced=replaced).SerializeToString()  # fmt: skip

            return admin_pb2.SetGoldRankingResponse.FromString(await self._idempotent_write(
                caller, "SetGoldRanking", request, work, detail,
                lambda answer: {"replaced": admin_pb2.SetGoldRankingResponse.FromString(answer).replaced}))

    async def GetLabelerQuality(self, request: admin_pb2.GetLabelerQualityRequest,
                                context: grpc.aio.ServicerContext) -> admin_pb2.LabelerQuality:
        async with self._admin_call(context, "GetLabelerQuality", {}):
            c = self._config
            quality = labeler_quality(await self._store.read(labeler_work()), min_agreement=c.label_gold_min_agreement,
                                      min_tasks=c.label_gold_min_tasks)  # fmt: skip
            quality.overlap_share, quality.gold_share = c.label_overlap_share, c.label_gold_share
            self._metrics.record_labeler_quality(
                pairwise={s.labeler_id: _optional(s, "pairwise_agreement") for s in quality.labelers},
                gold={s.labeler_id: _optional(s, "gold_agreement") for s in quality.labelers},
                flagged=sum(s.flagged for s in quality.labelers),
                group_alpha={g.labeler_group: _optional(g, "krippendorff_alpha") for g in [*quality.groups, quality.overall]})
            return quality

    async def GetRatingsReport(self, request: admin_pb2.GetRatingsReportRequest,
                               context: grpc.aio.ServicerContext) -> admin_pb2.RatingsReport:
        async with self._admin_call(context, "GetRatingsReport", {}):
            versions = await self._store.read(ratings_by_version(RATING_FLAGS))
            return admin_pb2.RatingsReport(versions=[
                admin_pb2.VersionRatings(policy_version=v.policy_version, ratings=v.ratings, mean_overall=v.mean_overall,
                                         flag_share={name: v.flag_counts[name] / v.ratings for name in RATING_FLAGS})
                for v in versions])  # fmt: skip

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
                verify_seconds=round(outcome.verify_seconds, 4), swap_mode=outcome.swap_mode,
                continued_requests=outcome.continued_requests, aborted_requests=outcome.aborted_requests)  # fmt: skip


def _check_label_k_and_ties(groups: list[list[str]]) -> None:
    """A gold ranking follows SubmitRanking's rules: 4 <= K <= 9 and not all tied."""
    check_k(sum(len(g) for g in groups), min_k=LABEL_MIN_K, max_k=LABEL_MAX_K)
    check_not_all_tied(groups)


# ---------------------------------------------------------------- labeler quality


def task_key(prompt_id: str, ranking: Sequence[Sequence[str]]) -> tuple[str, tuple[str, ...]]:
    """Which completions a ranking ranked: rankings with the same key are comparable."""
    return prompt_id, tuple(sorted(cid for group in ranking for cid in group))


def labeler_quality(work: LabelerWork, *, min_agreement: float, min_tasks: int) -> admin_pb2.LabelerQuality:
    """The LabelerQuality message of the store's labeling work (the module docstring); the
    configuration fields besides the gold thresholds are the caller's to fill in."""
    labeled = [LabeledRanking(r.labeler_id, r.labeler_group or "", task_key(r.prompt_id, r.ranking), r.ranking)
               for r in work.rankings]  # fmt: skip
    figures = labeler_figures(labeled, {task_key(g.prompt_id, g.ranking): g.ranking for g in work.gold})
    done: Counter[str] = Counter(r.labeler_id for r in work.rankings)
    seconds: defaultdict[str, list[float]] = defaultdict(list)
    group = {labeler: g or "" for labeler, g in work.groups.items()}
    for r in work.rankings:  # oldest first: a labeler's group is that of their newest ranking
        group[r.labeler_id] = r.labeler_group or ""
        if r.seconds is not None:
            seconds[r.labeler_id].append(r.seconds)
    stats = []
    for labeler in sorted(set(done) | set(work.declined)):
        mine = figures.get(labeler, LabelerFigures())
        reason = _flag_reason(mine, min_agreement, min_tasks)
        stats.append(admin_pb2.LabelerStats(
            labeler_id=labeler, labeler_group=group.get(labeler, ""), tasks_done=done[labeler],
            tasks_declined=work.declined.get(labeler, 0),
            median_seconds_per_task=statistics.median(seconds[labeler]) if seconds[labeler] else None,
            shared_tasks=mine.shared_tasks, pairwise_agreement=mine.with_others.share, gold_tasks=mine.gold_tasks,
            gold_agreement=mine.with_gold.share, flagged=bool(reason), flag_reason=reason))  # fmt: skip
    groups = sorted({r.group for r in labeled if r.group})  # labelers without a group count only overall
    return admin_pb2.LabelerQuality(
        labelers=stats, groups=[_group_agreement(g, group_figures([r for r in labeled if r.group == g])) for g in groups],
        overall=_group_agreement("", group_figures(labeled)), gold_min_agreement=min_agreement,
        gold_min_tasks=min_tasks)  # fmt: skip


def _flag_reason(figures: LabelerFigures, min_agreement: float, min_tasks: int) -> str:
    """Why a labeler is flagged, in words; "" when they are not."""
    share = figures.with_gold.share
    if figures.gold_tasks < min_tasks or share is None or share >= min_agreement:
        return ""
    return (f"ordered {figures.with_gold.agreeing} of {figures.with_gold.pairs} gold pairs as the gold rankings do "
            f"({share:.1%}) over {figures.gold_tasks} gold tasks, below the {min_agreement:.1%} required")


def _group_agreement(name: str, figures: GroupFigures) -> admin_pb2.GroupAgreement:
    return admin_pb2.GroupAgreement(
        labeler_group=name, labelers=figures.labelers, shared_tasks=figures.shared_tasks,
        pairs=figures.agreement.pairs, pairwise_agreement=figures.agreement.share,
        krippendorff_alpha=figures.alpha)  # fmt: skip


def _optional(message: Any, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None


def _erasure_counts(response: admin_pb2.EraseUserResponse) -> dict[str, Any]:
    return {"rows_deleted": dict(response.rows_deleted), "audit_rows_pseudonymised": response.audit_rows_pseudonymised}
