"""rlhf.v1.Feedback: where human judgement enters the system (role labeler or higher).

NextComparison leases a labeling task: a logged prompt of a TRAIN- or VAL-split user
(val comparisons are what the reward model and the gate are judged on; test prompts are
never shown), chosen freshest first: fewest rankings, then newest. A prompt the caller
has ranked or declined, a prompt someone holds a live lease on, and a prompt flagged as
holding PII that was never redacted are skipped (with the server's default
`pii_ingest = "flag"`, that is every prompt with PII in any chat turn); a redacted prompt
is shown (and sampled) as its redacted text. The K completions are sampled NOW from the
serving policy (temperature 1.0, purpose "label", each logged with its policy version and
flagged for PII like served ones) and committed, with the lease and the idempotency
record, before the task is returned. A completion flagged for PII is shown as its
redacted text (the text the reward models then train on), never as generated. When the
queue is empty the answer is NOT_FOUND "no prompt waiting for labels" (nothing the caller
can fix; retry later).

Labeler quality, measured (Admin.GetLabelerQuality) without telling labelers:
- Shared prompts: a fixed share of prompts (`label_overlap_share`, by the sha256 of the
  prompt id) is ranked by `label_overlap_labelers` different labelers on the SAME
  completions: once such a prompt's first task was ranked, it is offered FIRST to other
  labelers (who have not ranked or declined it), and their tasks reuse that task's
  completion ids (no new samples) until that many ranked them.
- Gold tasks: with probability `label_gold_share` (an injectable `random.Random`) a
  request gets a task over a gold ranking's completions (Admin.SetGoldRanking), when one
  waits that this labeler has not ranked or declined and nobody leases.
Both are given only to requests of their K (a task holds the K the labeler asked for).
`shown_at` records when a task's completions reached the labeler (time per task ends at
the ranking).

DeclineTask closes this labeler's live task without a ranking: SKIPPED (no judgement) or
NONE_ACCEPTABLE (every completion is unacceptable: stored on the task as its verdict,
never as a ranking, so no reward model trains on it). Either way the prompt is not
offered to this labeler again; others still get it. GetProgress tells the caller who
they are, their work since midnight UTC and how many prompts wait for them (counted up
to `QUEUE_COUNT_CAP`).

Leases. A lease lasts `lease_seconds`. An expired lease frees its prompt for anyone;
when the serving policy has not changed since and K matches, its completions are
leased again (as a new task) instead of being sampled anew. A retry of NextComparison
with the same request_id while the lease lasts returns the same task; after it ended,
the id leases a new one. The prompt is picked by a READ (it scans the prompts) and
claimed by a short write that re-checks it is still free, so the single writer, which
also logs the serving traffic, never waits on the scan; the claim holds the prompt
while the completions are sampled, and is released if sampling fails or the caller
leaves.

Submissions (SubmitRanking, DeclineTask, SubmitDemonstration, SubmitRating) need a request_id: a
retry returns the first answer and stores nothing twice; the same id with another
payload is refused with ALREADY_EXISTS. Each submission, its validation against the
stored rows, its idempotency record and its audit row (who: user and role; what: the
method and the ids, never the text; when) are ONE store transaction
(`common.store.run_mutation`): a refused call stores nothing, an acknowledged one is
committed with its audit row. A lease is audited the same way, in its lease transaction.

Limits: every call counts against the caller's request rate (`server.auth`), and the K
samples of a lease against the labeler's key like a Generate call: a concurrency slot and
K x label_max_new_tokens tokens reserved (the unused part refunded).

A ranking names a leased task (and must order exactly its K completions) or, without
a task, a prompt and 4..9 of that prompt's logged completions (any of them: served or
sampled for labeling). Statuses: malformed rankings (empty group, a completion twice,
missing or foreign completions, K outside 4..9, all tied) INVALID_ARGUMENT; unknown
prompt or task NOT_FOUND; an expired, already answered or declined task
FAILED_PRECONDITION (an expired one says when); another labeler's task, or a caller
below the labeler role, PERMISSION_DENIED. DeclineTask refuses a task the same way, and
a reason left unspecified or a comment over 4096 characters with INVALID_ARGUMENT. The
labeler group stored with each piece of feedback is the caller's API key's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from sqlite_utils import Database

from common.pii import redact_pii, safe_text
from common.store import (
    Completion,
    InvalidArgumentError,
    Mutation,
    NewCompletion,
    Prompt,
    add_completions,
    add_demonstration,
    add_prompt,
    add_ranking,
    add_rating,
    commit_mutation,
    decline_task,
    expire_tasks,
    get_completion,
    get_prompt,
    get_task,
    gold_completions,
    labeler_day,
    lease_task,
    pick_gold_prompts,
    pick_prompts,
    prompt_is_free,
    release_task,
    replay_mutation,
    reusable_completions,
    run_mutation,
    set_task_completions,
    shared_completions,
)
from common.store.rankings import (
    LABEL_MAX_K,
    LABEL_MIN_K,
    check_k,
    check_not_all_tied,
    check_ranking_shape,
    count_pairs,
)
from rlhf.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc
from server.auth import Caller
from server.engines.base import SamplingOptions
from server.generation import sampling_record
from server.servicers import KeyedLocks, ServerDeps, convert, payload_sha256, require_ready, rpc_errors

SERVICE = "rlhf.v1.Feedback"
MAX_REQUEST_ID_CHARS = 128
MAX_COMMENT_CHARS = 4096  # the contract's limit
MAX_RESPONSE_CHARS = 32768
MAX_PROMPT_CHARS = 65536
RATING_FLAGS = tuple(f.name for f in feedback_pb2.RatingFlags.DESCRIPTOR.fields)
NO_PROMPT_WAITING = "no prompt waiting for labels"
DECLINE_REASON_NAMES = {feedback_pb2.SKIPPED: "skipped", feedback_pb2.NONE_ACCEPTABLE: "none_acceptable"}


class Refusal(Exception):
    """A call refused with a specific gRPC status (raised inside store ops, so the
    transaction rolls back, and answered by the servicer)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


@contextlib.asynccontextmanager
async def feedback_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """`rpc_errors`, plus our Refusals with their own status."""
    async with rpc_errors(context):
        try:
            yield
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)


def shown_text(prompt: Prompt) -> str:
    """What the labeler sees and the policy answers: the redacted text of a PII prompt."""
    return prompt.redacted_text if prompt.has_pii and prompt.redacted_text is not None else prompt.text


def shown_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The conversation to sample from. A redacted prompt is its redacted text alone
    (earlier turns were not redacted, so they are never shown)."""
    if prompt.messages and not prompt.has_pii:
        return [dict(m) for m in prompt.messages]
    return [{"role": "user", "content": shown_text(prompt)}]


def shown_completion(completion: Completion) -> Completion:
    """What the labeler sees of a completion: its redacted text when it was flagged for PII."""
    if not completion.has_pii:
        return completion
    return dataclasses.replace(completion, text=safe_text(completion.text, True, completion.redacted_text))


def task_message(task_id: str, prompt: Prompt, completions: list[Completion], expires_at: float) -> feedback_pb2.ComparisonTask:
    messages = shown_messages(prompt) if prompt.messages and not prompt.has_pii else []
    return feedback_pb2.ComparisonTask(
        task_id=task_id,
        prompt_id=prompt.id,
        prompt_text=shown_text(prompt),
        messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        completions=[convert.completion(shown_completion(c)) for c in sorted(completions, key=lambda c: c.idx)],
        lease_expires_at=convert.timestamp(expires_at),
    )


@dataclass(frozen=True)
class _Claim:
    """What the claim transaction decided: a task id on a prompt, with completions to
    reuse, or none (sample new ones)."""

    task_id: str
    prompt: Prompt
    reused: list[Completion] | None


# ---------------------------------------------------------------- the servicer


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    """Labeling queue and feedback intake (see the module docstring)."""

    def __init__(self, deps: ServerDeps, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        """K, the lease, the sample length and the shared and gold shares come from
        `deps.config` (its label_* fields, validated there); `clock` gives the lease times
        and `rng` draws the gold tasks (a test may pass its own)."""
        self._store = deps.store
        self._engine = deps.engine
        self._auth = deps.auth
        self._k_default = deps.config.label_k
        self._lease_seconds = deps.config.label_lease_seconds
        self._max_new_tokens = deps.config.label_max_new_tokens
        self._overlap_share = deps.config.label_overlap_share
        self._overlap_labelers = deps.config.label_overlap_labelers
        self._gold_share = deps.config.label_gold_share
        self._rng = rng or random.Random()
        self._ready = deps.engine_ready
        self._budget = deps.budget
        self._pii = deps.completion_log.pii
        self._clock = clock
        self._request_ids = KeyedLocks()

    # ------------------------------------------------------------ NextComparison

    async def NextComparison(
        self, request: feedback_pb2.NextComparisonRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.ComparisonTask:
        async with feedback_errors(context):
            caller = await self._auth.authorize(context, "labeler")
            k = request.k or self._k_default
            if not LABEL_MIN_K <= k <= LABEL_MAX_K:
                raise _invalid(f"k = {k}: a task holds {LABEL_MIN_K}..{LABEL_MAX_K} completions (0 = the server default, {self._k_default})")
            _check_request_id(request.request_id, required=False)
            mutation = _mutation(caller, "NextComparison", request, {"k": k})
            key = (caller.user_id, mutation.method, request.request_id)
            async with self._request_ids.hold(key) if request.request_id else contextlib.nullcontext():
                replay = (await self._store.read(replay_mutation(mutation, _lease_is_live(self._clock())))
                          if request.request_id else None)
                if replay is not None:
                    return feedback_pb2.ComparisonTask.FromString(replay)
                require_ready(self._ready)
                # The labeler's key pays for the K samples like a Generate call: a slot, and
                # K x label_max_new_tokens tokens reserved (refunded: reused or shorter samples).
                with self._budget.hold(caller.limit_key, k * self._max_new_tokens) as charge:
                    claim = await self._claim(caller, k)
                    try:
                        samples = [] if claim.reused else await self._sample(claim, k)
                        charge.used = sum(s.completion_tokens for s in samples)
                        return await self._store.write(self._lease_op(claim, samples, mutation))
                    except BaseException:  # failed or cancelled: the task never reached the caller
                        await asyncio.shield(self._store.write(release_task(claim.task_id, self._clock())))
                        raise

    async def _claim(self, caller: Caller, k: int, candidates: int = 8, attempts: int = 5) -> _Claim:
        """Pick prompts with a read, then claim the first one still free with a lease row,
        in a short write. Concurrent labelers may take the picked ones first: pick again.
        With probability label_gold_share a waiting gold task is tried first."""
        if self._gold_share and self._rng.random() < self._gold_share:
            golds = await self._store.read(pick_gold_prompts(caller.user_id, self._clock(), k, candidates))
            claim = await self._store.write(self._claim_op(caller, k, golds, gold=True)) if golds else None
            if claim is not None:
                return claim
        for _ in range(attempts):
            prompts = await self._store.read(pick_prompts(
                caller.user_id, self._clock(), candidates, k=k, overlap_share=self._overlap_share,
                overlap_labelers=self._overlap_labelers))  # fmt: skip
            if not prompts:
                break
            claim = await self._store.write(self._claim_op(caller, k, prompts))
            if claim is not None:
                return claim
        raise Refusal(grpc.StatusCode.NOT_FOUND, NO_PROMPT_WAITING)

    def _claim_op(self, caller: Caller, k: int, prompts: list[Prompt], gold: bool = False,
                  ) -> Callable[[Database], _Claim | None]:  # fmt: skip
        """Lease the first of `prompts` still free; None when all were taken meanwhile. A
        gold task reuses its gold ranking's completions; any other task those of a shared
        prompt's first ranked set, else of an expired task when they come from the serving
        policy, else none (they are sampled next)."""

        def reuse(db: Database, prompt_id: str) -> list[str] | None:
            if gold:
                return gold_completions(prompt_id, k)(db)
            return (shared_completions(prompt_id, k, self._overlap_share, self._overlap_labelers)(db)
                    or reusable_completions(prompt_id, k, self._engine.version)(db))  # fmt: skip

        def op(db: Database) -> _Claim | None:
            now = self._clock()
            expire_tasks(now)(db)
            for prompt in prompts:
                if not prompt_is_free(prompt.id, caller.user_id, now)(db):
                    continue
                reused_ids = reuse(db, prompt.id)
                if gold and reused_ids is None:  # the gold ranking was replaced or erased since the pick
                    continue
                # Without reused completions the task holds none while they are sampled: the
                # prompt is claimed, but the task cannot be answered yet.
                task = lease_task(prompt.id, caller.user_id, reused_ids or [], self._lease_seconds, k=k, now=now)(db)
                reused = [get_completion(cid)(db) for cid in reused_ids] if reused_ids else None
                return _Claim(task.id, prompt, reused)  # type: ignore[arg-type]
            return None

        return op

    async def _sample(self, claim: _Claim, k: int) -> list[NewCompletion]:
        """K samples of the serving policy for the claimed prompt (not yet logged)."""
        prompt_ids = self._engine.render_chat(shown_messages(claim.prompt))
        options = SamplingOptions(n=k, max_new_tokens=self._max_new_tokens, temperature=1.0)
        texts, done, versions, tokens = [""] * k, [None] * k, [-1] * k, [0] * k
        first_token: list[float | None] = [None] * k
        started = time.perf_counter()
        latency = [0.0] * k
        spans: list[tuple[tuple[int, int, int], ...]] = [()] * k
        async for update in self._engine.generate(f"label-{claim.task_id}", prompt_ids, options):
            i = update.index
            texts[i] += update.text_delta
            versions[i], tokens[i] = update.policy_version, update.completion_tokens
            if first_token[i] is None and update.completion_tokens > 0:
                first_token[i] = time.perf_counter() - started
            if update.finished:
                done[i], latency[i] = update.finish_reason or "stop", time.perf_counter() - started
                spans[i] = tuple((v.version, v.start, v.end) for v in update.version_spans)
        if any(reason in (None, "abort") for reason in done):
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "sampling the completions was aborted (the server may be shutting down); retry")
        sampling = sampling_record(options)
        samples = [
            NewCompletion(idx=i, text=texts[i], policy_version=versions[i], finish_reason=done[i],  # type: ignore[arg-type]
                          prompt_tokens=len(prompt_ids), completion_tokens=tokens[i], latency_s=latency[i],
                          sampling=sampling, ttft_s=first_token[i], purpose="label", version_spans=spans[i])
            for i in range(k)
        ]  # fmt: skip
        # Flagged for PII like served samples (off the event loop); a labeler sees the redacted text.
        return await asyncio.to_thread(lambda: [self._pii.completion(s) for s in samples])

    def _lease_op(self, claim: _Claim, samples: list[NewCompletion],
                  mutation: Mutation) -> Callable[[Database], feedback_pb2.ComparisonTask]:  # fmt: skip
        """Log the new samples, fill in and start the lease, record the answer under the
        request_id (replacing one that names an expired lease) and the audit row: one
        transaction, committed before the task is returned."""

        def lease(db: Database) -> bytes:
            now = self._clock()
            stored = claim.reused or add_completions(claim.prompt.id, samples, now=now)(db)
            expires_at = now + self._lease_seconds
            set_task_completions(claim.task_id, [c.id for c in stored], expires_at, shown_at=now)(db)
            return task_message(claim.task_id, claim.prompt, stored, expires_at).SerializeToString()

        result_ids = {"task_id": claim.task_id, "prompt_id": claim.prompt.id}

        def op(db: Database) -> feedback_pb2.ComparisonTask:
            answer = commit_mutation(mutation, lease, result_ids=lambda _: result_ids, now=self._clock())(db)
            return feedback_pb2.ComparisonTask.FromString(answer)

        return op

    # ------------------------------------------------------------ SubmitRanking

    async def SubmitRanking(
        self, request: feedback_pb2.SubmitRankingRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitRankingResponse:
        async with feedback_errors(context):
            caller = await self._auth.authorize(context, "labeler")
            _check_request_id(request.request_id, required=True)
            groups = [list(g.completion_ids) for g in request.ranking]

            def work(db: Database) -> bytes:
                _check_shape(groups)
                if not (request.task_id or request.prompt_id):
                    raise _invalid("give the task_id of a leased task (or a prompt_id)")
                # The ids are checked against the task or the prompt before K and ties.
                ranking = add_ranking(request.prompt_id, caller.user_id, groups,
                                      labeler_group=caller.identity.labeler_group, task_id=request.task_id or None,
                                      check_groups=_check_k_and_ties, now=self._clock())(db)  # fmt: skip
                return feedback_pb2.SubmitRankingResponse(ranking_id=ranking.id, comparisons=count_pairs(groups)).SerializeToString()

            ids = {"task_id": request.task_id, "prompt_id": request.prompt_id}
            return await self._idempotent(caller, "SubmitRanking", request, work, feedback_pb2.SubmitRankingResponse,
                                          ids, lambda r: {"ranking_id": r.ranking_id})  # fmt: skip

    # ------------------------------------------------------------ DeclineTask

    async def DeclineTask(
        self, request: feedback_pb2.DeclineTaskRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.DeclineTaskResponse:
        async with feedback_errors(context):
            caller = await self._auth.authorize(context, "labeler")
            _check_request_id(request.request_id, required=True)
            if not request.task_id:
                raise _invalid("task_id is required: the leased task being declined")
            if request.reason not in DECLINE_REASON_NAMES:
                raise _invalid(f"reason = {request.reason}: say why, SKIPPED (no judgement) or NONE_ACCEPTABLE "
                               "(every completion is unacceptable)")
            if len(request.comment) > MAX_COMMENT_CHARS:
                raise _invalid(f"the comment is {len(request.comment)} characters; at most {MAX_COMMENT_CHARS}")
            decline = decline_task(request.task_id, caller.user_id, DECLINE_REASON_NAMES[request.reason],  # type: ignore[arg-type]
                                   request.comment, now=self._clock())  # fmt: skip

            def work(db: Database) -> bytes:
                task = decline(db)
                return feedback_pb2.DeclineTaskResponse(task_id=task.id, reason=request.reason).SerializeToString()

            return await self._idempotent(caller, "DeclineTask", request, work, feedback_pb2.DeclineTaskResponse,
                                          {"task_id": request.task_id, "reason": DECLINE_REASON_NAMES[request.reason]},
                                          lambda r: {})  # fmt: skip

    # ------------------------------------------------------------ GetProgress

    async def GetProgress(
        self, request: feedback_pb2.GetProgressRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.Progress:
        async with feedback_errors(context):
            caller = await self._auth.authorize(context, "labeler")
            now = self._clock()
            midnight_utc = now - now % 86400  # unix time counts no leap seconds: every day is 86400 s
            day = await self._store.read(labeler_day(caller.user_id, since=midnight_utc, now=now))
            return feedback_pb2.Progress(
                user_id=caller.user_id, role=caller.identity.role, labeler_group=caller.identity.labeler_group or "",
                ranked_today=day.rankings, declined_today=day.declines, demonstrations_today=day.demonstrations,
                ratings_today=day.ratings, queue_waiting=day.queue_waiting)  # fmt: skip

    # ------------------------------------------------------------ SubmitDemonstration

    async def SubmitDemonstration(
        self, request: feedback_pb2.SubmitDemonstrationRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitDemonstrationResponse:
        async with feedback_errors(context):
            caller = await self._auth.authorize(context, "labeler")
            _check_request_id(request.request_id, required=True)
            if not request.response.strip():
                raise _invalid("the response is empty: write the answer the model should give")
            if len(request.response) > MAX_RESPONSE_CHARS:
                raise _invalid(f"the response is {len(request.response)} characters; at most {MAX_RESPONSE_CHARS}")
            kind = request.WhichOneof("prompt")
            if kind is None:
                raise _invalid("give a prompt_id (an existing prompt) or a prompt_text (a new one)")
            if kind == "prompt_text" and not request.prompt_text.strip():
                raise _invalid("prompt_text is empty")
            if len(request.prompt_text) > MAX_PROMPT_CHARS:
                raise _invalid(f"prompt_text is {len(request.prompt_text)} characters; at most {MAX_PROMPT_CHARS}")
            # A new prompt is flagged (or redacted) like served ones; in redact mode so is the response.
            scanned = await asyncio.to_thread(self._pii.prompt, request.prompt_text, None) if kind == "prompt_text" else None
            response = request.response if self._pii.mode == "flag" else await asyncio.to_thread(
                redact_pii, request.response, self._pii.region)

            def work(db: Database) -> bytes:
                now = self._clock()
                if kind == "prompt_id":
                    if get_prompt(request.prompt_id)(db) is None:
                        raise Refusal(grpc.StatusCode.NOT_FOUND, f"prompt {request.prompt_id!r} not found")
                    prompt_id = request.prompt_id
                else:
                    assert scanned is not None
                    prompt_id = add_prompt(caller.user_id, scanned.text, source="demonstration",
                                           has_pii=scanned.has_pii, redacted_text=scanned.redacted_text,
                                           request_id=request.request_id, now=now)(db).id  # fmt: skip
                demo = add_demonstration(prompt_id, caller.user_id, response,
                                         labeler_group=caller.identity.labeler_group, now=now)(db)  # fmt: skip
                return feedback_pb2.SubmitDemonstrationResponse(demonstration_id=demo.id, prompt_id=prompt_id).SerializeToString()

            ids = {"prompt_id": request.prompt_id} if kind == "prompt_id" else {}
            return await self._idempotent(caller, "SubmitDemonstration", request, work, feedback_pb2.SubmitDemonstrationResponse,
                                          ids, lambda r: {"demonstration_id": r.demonstration_id, "prompt_id": r.prompt_id})  # fmt: skip

    # ------------------------------------------------------------ SubmitRating

    async def SubmitRating(
        self, request: feedback_pb2.SubmitRatingRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitRatingResponse:
        async with feedback_errors(context):
            caller = await self._auth.authorize(context, "labeler")
            _check_request_id(request.request_id, required=True)
            if not request.completion_id:
                raise _invalid("completion_id is required")
            if not 1 <= request.overall <= 7:
                raise _invalid(f"overall = {request.overall}: the Likert scale is 1..7 (7 best)")
            if len(request.comment) > MAX_COMMENT_CHARS:
                raise _invalid(f"the comment is {len(request.comment)} characters; at most {MAX_COMMENT_CHARS}")
            flags = {name: getattr(request.flags, name) for name in RATING_FLAGS}

            def work(db: Database) -> bytes:
                if get_completion(request.completion_id)(db) is None:
                    raise Refusal(grpc.StatusCode.NOT_FOUND, f"completion {request.completion_id!r} not found")
                rating = add_rating(request.completion_id, caller.user_id, request.overall, flags,
                                    comment=request.comment, labeler_group=caller.identity.labeler_group,
                                    now=self._clock())(db)  # fmt: skip
                return feedback_pb2.SubmitRatingResponse(rating_id=rating.id).SerializeToString()

            return await self._idempotent(caller, "SubmitRating", request, work, feedback_pb2.SubmitRatingResponse,
                                          {"completion_id": request.completion_id}, lambda r: {"rating_id": r.rating_id})  # fmt: skip

    # ------------------------------------------------------------ shared

    async def _idempotent(self, caller: Caller, name: str, request: Message, work: Callable[[Database], bytes],
                          response_type: type[Any], ids: dict[str, Any],
                          result_ids: Callable[[Any], dict[str, Any]]) -> Any:  # fmt: skip
        """Replay the first answer to this request_id, or run `work` and commit its answer
        and audit row with it (`common.store.run_mutation`; the single writer serializes
        concurrent retries). `ids` name what the request points at, `result_ids` what it made."""
        mutation = _mutation(caller, name, request, {k: v for k, v in ids.items() if v})
        outcome = await self._store.write(run_mutation(
            mutation, work, result_ids=lambda answer: result_ids(response_type.FromString(answer)), now=self._clock()))
        return response_type.FromString(outcome.response)


def _mutation(caller: Caller, name: str, request: Message, ids: dict[str, Any]) -> Mutation:
    """The store's view of a Feedback mutation: who (user, role), which method and ids."""
    return Mutation(caller.user_id, caller.identity.role, f"feedback.{name}", f"{SERVICE}/{name}",
                    request.request_id, payload_sha256(request), ids)  # type: ignore[attr-defined]  # fmt: skip


def _check_request_id(request_id: str, *, required: bool) -> None:
    if required and not request_id:
        raise _invalid("request_id is required: a client-chosen id (e.g. a uuid4) that makes retries safe")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise _invalid(f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")


def _check_shape(groups: list[list[str]]) -> list[str]:
    """Empty groups, blank or repeated ids: checked before anything is looked up."""
    try:
        return check_ranking_shape(groups)
    except InvalidArgumentError as err:
        raise _invalid(str(err)) from None


def _check_k_and_ties(groups: list[list[str]]) -> None:
    """4 <= K <= 9 and not all tied: checked after the ids are known to be right, so a
    missing or foreign id is named rather than reported as a wrong K."""
    try:
        check_k(sum(len(g) for g in groups), min_k=LABEL_MIN_K, max_k=LABEL_MAX_K)
        check_not_all_tied(groups)
    except InvalidArgumentError as err:
        raise _invalid(str(err)) from None


def _lease_is_live(now: float) -> Callable[[Database, bytes], bool]:
    """A recorded NextComparison answer replays only while its lease lasts; after it, the
    request_id leases a new task."""

    def live(db: Database, answer: bytes) -> bool:
        task = get_task(feedback_pb2.ComparisonTask.FromString(answer).task_id)(db)
        return task is not None and task.is_live(now)

    return live
