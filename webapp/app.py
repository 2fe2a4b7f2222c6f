"""`rlhf web`: the labeling web app (Starlette, served by uvicorn; plain HTML, CSS and JS).

It talks to the rlhf server only through the gRPC API (`clients.client.AsyncRlhfClient`,
one channel without a key): each call carries the signed-in labeler's key as metadata,
and the key itself lives only in the server-side session (`webapp.sessions`).

    rlhf web --server 127.0.0.1:50051            # prints its URL: http://127.0.0.1:8080/

Pages: /login (an API key of role labeler or admin), /label (lease a task, rank, rate,
decline, demonstrate); for admins only: /admin (labeler quality, ratings per policy
version, row counts), /admin/cycles (the training cycles, their figures and charts) and
/admin/policies (the versions; swap and rollback, each behind a confirmation page).
Every POST carries the session's CSRF token; every labeling, swap and rollback form
carries a fresh uuid4 request_id from which the request_id of each RPC is derived, so a
double click or a replayed form stores (or swaps) nothing twice; a GET changes nothing.
docs/WEBAPP.md has the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clients.client import AsyncRlhfClient
from rlhf.v1 import admin_pb2, common_pb2, feedback_pb2
from webapp import admin_views, views
from webapp.config import MAX_COMMENT_CHARS, MAX_DEMONSTRATION_CHARS, WebConfig
from webapp.forms import (
    RATING_FLAGS,
    FormProblem,
    LabelForm,
    Rating,
    check_lengths,
    check_request_id,
    flag_label,
    parse_ranking,
    parse_ratings,
    read_label_form,
    rpc_request_id,
)
from webapp.middleware import BodyLimit, SecurityHeaders
from webapp.pages import render, render_error
from webapp.problems import Code, Problem, explain, utc_time
from webapp.sessions import LoginTokens, Session, SessionStore

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "rlhf_session"
LOGIN_COOKIE = "rlhf_login"
CYCLES_SHOWN = 50  # the cycles page lists the newest this many (ListCycles' own default)
MAX_KEY_CHARS = 512
# Why /login is shown: a code in the URL, never free text (nothing a link can inject).
LOGIN_REASONS = {
    "signin": "Sign in with your API key to label.",
    "expired": "Your session ended (you signed out, it was idle too long, or the web app restarted): sign in again.",
    "signed_out": "You are signed out. Your key is no longer held by this web app.",
    "key": "The server no longer accepts your key (it may have been revoked): sign in again.",
}
NOT_A_LABELER = ("This key is not a labeler's: it has the user role, which may query the model but not label. "
                 "Ask an operator for a labeler key (rlhf keys create --role labeler).")
class Guidelines:
    """The operator's Markdown file (or the built-in one), rendered with raw HTML off and
    re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else HERE / "guidelines.md"
        self._markdown = MarkdownIt("js-default")
        self._mtime: float | None = None
        self._html = Markup("")

    def html(self) -> Markup:
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._html = Markup(self._markdown.render(self.path.read_text(encoding="utf-8")))
                self._mtime = mtime
        except OSError as err:
            log.warning("guidelines file %s unreadable: %s", self.path, err)
        return self._html


# ---------------------------------------------------------------- the app


class WebApp:
    """The routes' state: config, the one gRPC client, sessions, guidelines."""

    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.sessions = SessionStore(config.session_idle_seconds, config.max_sessions)
        self.login_tokens = LoginTokens()
        self.guidelines = Guidelines(config.guidelines)
        self._client: AsyncRlhfClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # api_key="" so $RLHF_API_KEY is never picked up: each call carries its labeler's key.
        self._client = AsyncRlhfClient(self.config.server, api_key="", root_cert=self.config.server_root_cert,
                                       tls=self.config.server_tls)  # fmt: skip
        try:
            yield
        finally:
            await self._client.close()

    @property
    def client(self) -> AsyncRlhfClient:
        assert self._client is not None, "the app's lifespan has not started"
        return self._client

    def routes(self) -> list[Route | Mount]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/label", self.label_page, methods=["GET"]),
            Route("/label", self.label_submit, methods=["POST"]),
            Route("/admin", self.admin_page, methods=["GET"]),
            Route("/admin/cycles", self.cycles_page, methods=["GET"]),
            Route("/admin/cycles/{cycle_id:int}", self.cycle_page, methods=["GET"]),
            Route("/admin/policies", self.policies_page, methods=["GET"]),
            Route("/admin/policies/swap", self.swap_question, methods=["POST"]),
            Route("/admin/policies/swap/confirm", self.swap, methods=["POST"]),
            Route("/admin/policies/rollback", self.rollback_question, methods=["POST"]),
            Route("/admin/policies/rollback/confirm", self.rollback, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # ------------------------------------------------------------ sessions and cookies

    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def _cookie(self, response: Response, name: str, value: str, max_age: int | None = None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", secure=self.config.https, httponly=True,
                            samesite="strict")  # fmt: skip

    async def _post_guard(self, request: Request) -> tuple[Session, FormData] | Response:
        """A POST needs a live session and its CSRF token; otherwise nothing is done."""
        session = self._session(request)
        if session is None:
            return render_error(401, "Not signed in",
                                "You are not signed in (or your session ended), so this form was not accepted and "
                                "nothing was stored. Sign in again.", link=("/login", "Sign in"))  # fmt: skip
        form = await request.form()
        token = form.get("csrf")
        if not session.csrf_ok(token if isinstance(token, str) else None):
            return render_error(403, "Form refused",
                                "This form's security token is missing or does not match your session (a CSRF "
                                "check: the form may come from another site), so it was refused and nothing was "
                                "stored. Reload the page and submit again.", session)  # fmt: skip
        return session, form

    def _timeout(self) -> float:
        return self.config.rpc_timeout_seconds

    # ------------------------------------------------------------ sign-in

    async def index(self, request: Request) -> Response:
        return RedirectResponse("/label" if self._session(request) else "/login", 303)

    def _login_form(self, status: int = 200, message: str | None = None, problem: str | None = None) -> Response:
        nonce = self.login_tokens.new_nonce()
        response = render("login.html", status, csrf=self.login_tokens.form_token(nonce), message=message,
                          problem=problem, server=self.config.server)  # fmt: skip
        self._cookie(response, LOGIN_COOKIE, nonce, max_age=3600)
        return response

    async def login_page(self, request: Request) -> Response:
        if self._session(request) is not None:
            return RedirectResponse("/label", 303)
        return self._login_form(message=LOGIN_REASONS.get(request.query_params.get("reason", "")))

    async def login(self, request: Request) -> Response:
        form = await request.form()
        token = form.get("csrf")
        if not self.login_tokens.check(request.cookies.get(LOGIN_COOKIE), token if isinstance(token, str) else None):
            return self._login_form(403, problem="The sign-in form's security token is missing or wrong (a CSRF "
                                                 "check: the form may come from another site). Sign in with this form.")
        key = form.get("api_key")
        key = key.strip() if isinstance(key, str) else ""
        if not key:
            return self._login_form(400, problem="Enter your API key.")
        if len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
            return self._login_form(400, problem="That is not an API key (keys are short printable text such as "
                                                 "rlhf_...).")
        metadata = (("authorization", f"Bearer {key}"),)
        try:
            progress = await self.client.feedback.GetProgress(feedback_pb2.GetProgressRequest(), metadata=metadata,
                                                              timeout=self._timeout())  # fmt: skip
        except grpc.aio.AioRpcError as err:
            if err.code() == Code.UNAUTHENTICATED:
                return self._login_form(401, problem="The server does not know this key (or it was revoked). "
                                                     "Check it and try again.")
            if err.code() == Code.PERMISSION_DENIED:
                return self._login_form(403, problem=NOT_A_LABELER)
            problem = explain(err, self.config.server)
            return self._login_form(problem.status, problem=problem.message)
        if progress.role not in ("labeler", "admin"):
            return self._login_form(403, problem=NOT_A_LABELER)
        previous = request.cookies.get(SESSION_COOKIE)
        if previous:
            self.sessions.delete(previous)  # a sign-in always starts a new session id
        session = self.sessions.create(key, progress.user_id, progress.role, progress.labeler_group)
        log.info("signed in: user %s (%s)", progress.user_id, progress.role)
        response = RedirectResponse("/label", 303)
        self._cookie(response, SESSION_COOKIE, session.id)
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: Request) -> Response:
        guard = await self._post_guard(request)
        if isinstance(guard, Response):
            return guard
        session, _ = guard
        self.sessions.delete(session.id)
        response = RedirectResponse("/login?reason=signed_out", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def _signed_out(self, session: Session) -> Response:
        """The server refused the key (revoked): end the session, back to sign-in."""
        self.sessions.delete(session.id)
        response = RedirectResponse("/login?reason=key", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ------------------------------------------------------------ the labeling page

    async def label_page(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return RedirectResponse("/login?reason=expired" if request.cookies.get(SESSION_COOKIE) else
                                    "/login?reason=signin", 303)  # fmt: skip
        notice = session.pop_notice()
        (task, lease_notice, problem), progress = await asyncio.gather(self._current_task(session),
                                                                      self._progress(session))  # fmt: skip
        if problem is not None and problem.status == 401:
            return self._signed_out(session)
        notices = [n for n in (notice, lease_notice) if n]
        return self._render_label(session, task, status=problem.status if problem else 200,
                                  problem=problem.message if problem else None, notices=notices,
                                  progress=progress)  # fmt: skip

    async def _current_task(self, session: Session) -> tuple[feedback_pb2.ComparisonTask | None, str | None,
                                                               Problem | None]:  # fmt: skip
        """The session's leased task, or a new lease (with the session's lease request_id,
        so concurrent or repeated loads get the same task)."""
        notice = None
        if session.task is not None and _lease_end(session.task) <= time.time():
            notice = f"The lease on your task expired at {utc_time(_lease_end(session.task))}; here is a new task."
            session.task_answered(session.task)
        if session.task is not None:
            return session.task, notice, None
        session.lease_request_id = session.lease_request_id or str(uuid.uuid4())
        request = feedback_pb2.NextComparisonRequest(k=self.config.k, request_id=session.lease_request_id)
        try:
            task = await self.client.feedback.NextComparison(request, metadata=session.metadata, timeout=self._timeout())
        except grpc.aio.AioRpcError as err:
            if err.code() == Code.NOT_FOUND:
                session.lease_request_id = None
                return None, notice, Problem(200, "No prompt is waiting; check back later.")
            return None, notice, explain(err, self.config.server)
        session.task = task
        return task, notice, None

    async def _progress(self, session: Session) -> feedback_pb2.Progress | None:
        try:
            return await self.client.feedback.GetProgress(feedback_pb2.GetProgressRequest(), metadata=session.metadata,
                                                          timeout=self._timeout())  # fmt: skip
        except grpc.aio.AioRpcError as err:
            log.info("GetProgress failed: %s", err.code().name)
            return None

    def _render_label(self, session: Session, task: feedback_pb2.ComparisonTask | None, *, status: int = 200,
                      problem: str | None = None, notices: Sequence[str] = (), progress: Any = None,
                      kept: dict[str, Any] | None = None, request_id: str | None = None) -> Response:  # fmt: skip
        kept = kept or {}
        return render(
            "label.html", status, session=session, current="/label", task=task, problem=problem, notices=list(notices),
            progress=views.progress_view(progress), guidelines=self.guidelines.html(),
            completions=views.completion_views(task, kept) if task is not None else [],
            lease_until=utc_time(_lease_end(task)) if task is not None else "",
            request_id=request_id or str(uuid.uuid4()), flags=[(name, flag_label(name)) for name in RATING_FLAGS],
            demonstration=kept.get("demonstration", ""), comment=kept.get("comment", ""),
            max_demonstration=MAX_DEMONSTRATION_CHARS, max_comment=MAX_COMMENT_CHARS,
        )  # fmt: skip

    # ------------------------------------------------------------ submitting

    async def label_submit(self, request: Request) -> Response:
        guard = await self._post_guard(request)
        if isinstance(guard, Response):
            return guard
        session, form = guard
        task = session.find_task(_text(form, "task_id"))
        if task is None:
            return render_error(409, "Not your current task",
                                "This form is for a task that is no longer yours (answered long ago, or leased "
                                "before you signed in again). Nothing was stored. Open the labeling page for your "
                                "current task.", session)  # fmt: skip
        ids = [c.completion_id for c in task.completions]
        kept = _kept_values(form, ids)
        try:
            fields = {key: value for key, value in form.items() if isinstance(value, str)}
            flags = {cid: [v for v in form.getlist(f"flag_{cid}") if isinstance(v, str)] for cid in ids}
            label_form = read_label_form(fields, flags, ids)
            check_lengths(label_form)
            groups = parse_ranking(label_form.ranks, ids) if label_form.action == "submit" else []
            ratings = parse_ratings(label_form.overall, label_form.flags, ids) if label_form.action != "skip" else []
        except FormProblem as problem:
            return self._render_label(session, task, status=problem.status, problem=f"Not submitted: {problem.message}.",
                                      kept=kept, request_id=_valid_request_id(fields.get("request_id", "")))  # fmt: skip
        try:
            if label_form.action == "submit":
                saved = await self._submit(session, task, label_form, groups, ratings)
            else:
                saved = await self._decline(session, task, label_form, ratings)
        except grpc.aio.AioRpcError as err:
            return self._refused(session, task, err, kept, label_form.request_id)
        session.notice = saved
        return RedirectResponse("/label", 303)

    async def _submit(self, session: Session, task: feedback_pb2.ComparisonTask, form: LabelForm,
                      groups: list[list[str]], ratings: list[Rating]) -> str:  # fmt: skip
        """The ranking first (it answers the lease), then the ratings and the demonstration."""
        request = feedback_pb2.SubmitRankingRequest(
            request_id=rpc_request_id(form.request_id, "rank"), task_id=task.task_id, prompt_id=task.prompt_id,
            ranking=[feedback_pb2.RankGroup(completion_ids=g) for g in groups])  # fmt: skip
        answer = await self.client.feedback.SubmitRanking(request, metadata=session.metadata, timeout=self._timeout())
        session.task_answered(task)
        extra = await self._rate_and_demonstrate(session, task, form, ratings)
        return f"Saved your ranking of {len(task.completions)} responses ({answer.comparisons} comparisons){extra}."

    async def _decline(self, session: Session, task: feedback_pb2.ComparisonTask, form: LabelForm,
                       ratings: list[Rating]) -> str:  # fmt: skip
        """Skip (nothing else is sent) or none acceptable (with any ratings and demonstration)."""
        reason = feedback_pb2.SKIPPED if form.action == "skip" else feedback_pb2.NONE_ACCEPTABLE
        request = feedback_pb2.DeclineTaskRequest(request_id=rpc_request_id(form.request_id, "decline"),
                                                  task_id=task.task_id, reason=reason, comment=form.comment)  # fmt: skip
        await self.client.feedback.DeclineTask(request, metadata=session.metadata, timeout=self._timeout())
        session.task_answered(task)
        if form.action == "skip":
            return "Skipped: you will not be given that prompt again."
        extra = await self._rate_and_demonstrate(session, task, form, ratings)
        return f"Saved: none of the responses is acceptable{extra}."

    async def _rate_and_demonstrate(self, session: Session, task: feedback_pb2.ComparisonTask, form: LabelForm,
                                    ratings: list[Rating]) -> str:  # fmt: skip
        calls = [self.client.feedback.SubmitRating(feedback_pb2.SubmitRatingRequest(
            request_id=rpc_request_id(form.request_id, "rating", r.completion_id), completion_id=r.completion_id,
            overall=r.overall, flags=feedback_pb2.RatingFlags(**r.flags)),
            metadata=session.metadata, timeout=self._timeout()) for r in ratings]  # fmt: skip
        demonstrated = bool(form.demonstration.strip())
        if demonstrated:
            calls.append(self.client.feedback.SubmitDemonstration(feedback_pb2.SubmitDemonstrationRequest(
                request_id=rpc_request_id(form.request_id, "demo"), prompt_id=task.prompt_id,
                response=form.demonstration), metadata=session.metadata, timeout=self._timeout()))  # fmt: skip
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the others are stored; the same form again replays them
        parts = [f"{len(ratings)} rating{'s' if len(ratings) != 1 else ''}"] if ratings else []
        parts += ["your demonstration"] if demonstrated else []
        return f", with {' and '.join(parts)}" if parts else ""

    def _refused(self, session: Session, task: feedback_pb2.ComparisonTask, err: grpc.aio.AioRpcError,
                 kept: dict[str, Any], request_id: str) -> Response:  # fmt: skip
        """A submission the server refused, in words: a closed lease moves on to a new task."""
        if err.code() in (Code.FAILED_PRECONDITION, Code.NOT_FOUND):
            closed_by_expiry = "expired" in (err.details() or "")
            session.task_answered(task)
            session.notice = (f"The lease on this task expired at {utc_time(_lease_end(task))}; nothing was stored. "
                              "Here is a new task." if closed_by_expiry else
                              f"This task is closed ({err.details()}); here is a new task.")  # fmt: skip
            return RedirectResponse("/label", 303)
        if err.code() == Code.UNAUTHENTICATED:
            return self._signed_out(session)
        problem = explain(err, self.config.server)
        return self._render_label(session, task, status=problem.status, problem=problem.message, kept=kept,
                                  request_id=request_id)  # fmt: skip

    # ------------------------------------------------------------ admin

    def _admin_only(self, session: Session) -> Response | None:
        """403 in words unless the session is an admin's (the server checks the role again)."""
        if session.role == "admin":
            return None
        return render_error(403, "Admins only",
                            f"The admin page is for admin keys; you are signed in as {session.user_id} with the "
                            f"{session.role} role.", session)  # fmt: skip

    def _admin_session(self, request: Request) -> Session | Response:
        """The signed-in admin of a GET, or the answer for anyone else."""
        session = self._session(request)
        if session is None:
            return RedirectResponse("/login?reason=signin", 303)
        return self._admin_only(session) or session

    async def _admin_post(self, request: Request) -> tuple[Session, FormData, str] | Response:
        """An admin's POST: a live session, its CSRF token, the admin role, and the form's
        request_id (a uuid4 rendered into it)."""
        guard = await self._post_guard(request)
        if isinstance(guard, Response):
            return guard
        session, form = guard
        refused = self._admin_only(session)
        if refused is not None:
            return refused
        request_id = _valid_request_id(_text(form, "request_id"))
        if request_id is None:
            return render_error(400, "Form refused", "This form has no valid request id, so nothing was done. "
                                "Open the policies page again for a fresh form.", session,
                                link=("/admin/policies", "Back to the policies"))  # fmt: skip
        return session, form, request_id

    def _admin_problem(self, session: Session, err: grpc.aio.AioRpcError) -> Problem | Response:
        """A failed Admin call: back to sign-in for a refused key, else the problem in words."""
        if err.code() == Code.UNAUTHENTICATED:
            return self._signed_out(session)
        return explain(err, self.config.server)

    async def admin_page(self, request: Request) -> Response:
        session = self._admin_session(request)
        if isinstance(session, Response):
            return session
        admin, md, timeout = self.client.admin, session.metadata, self._timeout()
        quality, ratings, stats = await asyncio.gather(
            admin.GetLabelerQuality(admin_pb2.GetLabelerQualityRequest(), metadata=md, timeout=timeout),
            admin.GetRatingsReport(admin_pb2.GetRatingsReportRequest(), metadata=md, timeout=timeout),
            admin.GetStats(admin_pb2.GetStatsRequest(), metadata=md, timeout=timeout),
            return_exceptions=True)  # fmt: skip
        sections: dict[str, Any] = {}
        for name, result, view in (("quality", quality, views.quality_view), ("ratings", ratings, views.ratings_view),
                                   ("stats", stats, views.stats_view)):  # fmt: skip
            if isinstance(result, grpc.aio.AioRpcError):
                if result.code() == Code.UNAUTHENTICATED:
                    return self._signed_out(session)
                sections[name], sections[f"{name}_problem"] = None, explain(result, self.config.server).message
            elif isinstance(result, BaseException):
                raise result
            else:
                sections[name], sections[f"{name}_problem"] = view(result), None
        return render("admin.html", session=session, current="/admin", **sections)

    # ------------------------------------------------------------ cycles

    async def cycles_page(self, request: Request) -> Response:
        session = self._admin_session(request)
        if isinstance(session, Response):
            return session
        try:
            listed = await self.client.admin.ListCycles(admin_pb2.ListCyclesRequest(limit=CYCLES_SHOWN),
                                                        metadata=session.metadata, timeout=self._timeout())  # fmt: skip
        except grpc.aio.AioRpcError as err:
            problem = self._admin_problem(session, err)
            return problem if isinstance(problem, Response) else render(
                "cycles.html", problem.status, session=session, current="/admin/cycles", cycles=None,
                problem=problem.message, limit=CYCLES_SHOWN)  # fmt: skip
        return render("cycles.html", session=session, current="/admin/cycles", problem=None, limit=CYCLES_SHOWN,
                      cycles=admin_views.cycles_view(listed.cycles))  # fmt: skip

    async def cycle_page(self, request: Request) -> Response:
        session = self._admin_session(request)
        if isinstance(session, Response):
            return session
        cycle_id = request.path_params["cycle_id"]
        try:
            cycle = await self.client.admin.GetCycle(admin_pb2.GetCycleRequest(cycle_id=cycle_id),
                                                     metadata=session.metadata, timeout=self._timeout())  # fmt: skip
        except grpc.aio.AioRpcError as err:
            if err.code() == Code.NOT_FOUND:
                return render_error(404, "No such cycle", f"The server has no cycle {cycle_id}.", session,
                                    link=("/admin/cycles", "All cycles"))  # fmt: skip
            problem = self._admin_problem(session, err)
            return problem if isinstance(problem, Response) else render_error(
                problem.status, "Cycle unavailable", problem.message, session, link=("/admin/cycles", "All cycles"))
        return render("cycle.html", session=session, current="/admin/cycles", cycle=admin_views.cycle_detail(cycle))

    # ------------------------------------------------------------ policies: list, confirm, swap

    async def _policies(self, session: Session) -> list[common_pb2.Policy]:
        listed = await self.client.admin.ListPolicies(admin_pb2.ListPoliciesRequest(), metadata=session.metadata,
                                                      timeout=self._timeout())  # fmt: skip
        return list(listed.policies)

    async def policies_page(self, request: Request) -> Response:
        session = self._admin_session(request)
        if isinstance(session, Response):
            return session
        try:
            view = admin_views.policies_view(await self._policies(session))
        except grpc.aio.AioRpcError as err:
            problem = self._admin_problem(session, err)
            return problem if isinstance(problem, Response) else render(
                "policies.html", problem.status, session=session, current="/admin/policies", policies=None,
                problem=problem.message, rollback_request_id="")  # fmt: skip
        for row in view["rows"]:
            row["request_id"] = str(uuid.uuid4())  # one per form: a double click swaps once
        return render("policies.html", session=session, current="/admin/policies", policies=view, problem=None,
                      rollback_request_id=str(uuid.uuid4()))  # fmt: skip

    async def swap_question(self, request: Request) -> Response:
        """The confirmation page of a swap: it names both versions; nothing changes yet."""
        post = await self._admin_post(request)
        if isinstance(post, Response):
            return post
        session, form, request_id = post
        version = _version(form)
        if version is None:
            return render_error(400, "Form refused", "This swap form names no policy version; nothing was done.",
                                session, link=("/admin/policies", "Back to the policies"))  # fmt: skip
        try:
            view = admin_views.policies_view(await self._policies(session))
        except grpc.aio.AioRpcError as err:
            problem = self._admin_problem(session, err)
            return problem if isinstance(problem, Response) else self._swap_outcome(
                session, "Swap not asked", problem.status, problem=problem.message)
        target = next((r for r in view["rows"] if r["version"] == version), None)
        serving = view["serving"]["name"] if view["serving"] else "the version serving now"
        if target is None or target["status"] == "serving":
            problem = "serves already" if target is not None else "is not a policy the server has"
            return self._swap_outcome(session, "Nothing to swap", 404 if target is None else 409,
                                      problem=f"v{version} {problem}; nothing was done.")  # fmt: skip
        details = [
            f"v{version} is {target['status']} (parent {target['parent']}, cycle {target['cycle']}, published "
            f"{target['created']}).",
            "In-flight requests are not cut off: in swap mode \"drain\" they finish on the old weights before "
            f"v{version} loads; in mode \"keep\" they continue on the new weights and are recorded with both "
            "versions. New requests wait while the weights load.",
            f"The checkpoint's hashes are verified first: if it fails verification or loading, the swap is refused "
            f"and {serving} keeps serving.",
        ]  # fmt: skip
        return render("policy_confirm.html", session=session, current="/admin/policies", heading="Swap the policy",
                      question=f"Swap the served policy from {serving} to v{version}?", details=details,
                      action="/admin/policies/swap/confirm", request_id=request_id, version=version,
                      confirm_label=f"Swap to v{version}")  # fmt: skip

    async def rollback_question(self, request: Request) -> Response:
        """The confirmation page of a rollback; nothing changes yet."""
        post = await self._admin_post(request)
        if isinstance(post, Response):
            return post
        session, _, request_id = post
        try:
            view = admin_views.policies_view(await self._policies(session))
        except grpc.aio.AioRpcError as err:
            problem = self._admin_problem(session, err)
            return problem if isinstance(problem, Response) else self._swap_outcome(
                session, "Rollback not asked", problem.status, problem=problem.message)
        serving = view["serving"]["name"] if view["serving"] else "the version serving now"
        target = view["rollback_to"] or "the version that served before it"
        details = [
            f"Rollback serves the version that started serving last before {serving}: {target}.",
            "In-flight requests are not cut off (see a swap); the checkpoint is verified first, and if it is refused "
            f"{serving} keeps serving.",
        ]  # fmt: skip
        return render("policy_confirm.html", session=session, current="/admin/policies", heading="Roll back",
                      question=f"Roll back from {serving} to {target}?", details=details,
                      action="/admin/policies/rollback/confirm", request_id=request_id, version=None,
                      confirm_label="Roll back")  # fmt: skip

    async def swap(self, request: Request) -> Response:
        """Admin.SwapPolicy, once per form: the request id comes from the form, so a replayed
        or double-clicked confirmation answers with the first swap's figures."""
        post = await self._admin_post(request)
        if isinstance(post, Response):
            return post
        session, form, request_id = post
        version = _version(form)
        if version is None:
            return render_error(400, "Form refused", "This swap form names no policy version; nothing was done.",
                                session, link=("/admin/policies", "Back to the policies"))  # fmt: skip
        call = self.client.admin.SwapPolicy(admin_pb2.SwapPolicyRequest(
            request_id=rpc_request_id(request_id, "swap"), version=version),
            metadata=session.metadata, timeout=self._timeout())  # fmt: skip
        return await self._swapped(session, call, "Swap")

    async def rollback(self, request: Request) -> Response:
        """Admin.Rollback to the version served before, once per form (as `swap`)."""
        post = await self._admin_post(request)
        if isinstance(post, Response):
            return post
        session, _, request_id = post
        call = self.client.admin.Rollback(admin_pb2.RollbackRequest(request_id=rpc_request_id(request_id, "rollback")),
                                          metadata=session.metadata, timeout=self._timeout())  # fmt: skip
        return await self._swapped(session, call, "Rollback")

    async def _swapped(self, session: Session, call: Any, what: str) -> Response:
        """The result page: the swap's figures, or the server's refusal in words."""
        try:
            answer = await call
        except grpc.aio.AioRpcError as err:
            if err.code() == Code.UNAUTHENTICATED:
                return self._signed_out(session)
            problem = await self._refusal(session, err)
            return self._swap_outcome(session, f"{what} refused", problem.status, problem=problem.message)
        log.info("%s by %s: v%d -> v%d", what.lower(), session.user_id, answer.previous_version, answer.version)
        return self._swap_outcome(session, f"{what} done", 200, swap=admin_views.swap_view(answer))

    async def _refusal(self, session: Session, err: grpc.aio.AioRpcError) -> Problem:
        """A refused swap in words; a refusal names the version that serves after it."""
        details = (err.details() or "").rstrip(".")
        if err.code() == Code.FAILED_PRECONDITION:
            try:
                serving = admin_views.policies_view(await self._policies(session))["serving"]
            except grpc.aio.AioRpcError:
                serving = None
            still = f"{serving['name']} keeps serving" if serving else "the serving version is unchanged"
            return Problem(409, f"The server refused: {details}. Nothing changed: {still}.")
        if err.code() == Code.NOT_FOUND:
            return Problem(404, f"The server refused: {details}. Nothing changed.")
        return explain(err, self.config.server)

    def _swap_outcome(self, session: Session, title: str, status: int, *, swap: dict[str, Any] | None = None,
                      problem: str = "") -> Response:  # fmt: skip
        return render("swap_result.html", status, session=session, current="/admin/policies", title=title, swap=swap,
                      problem=problem)  # fmt: skip


def _lease_end(task: feedback_pb2.ComparisonTask) -> float:
    return task.lease_expires_at.ToNanoseconds() / 1e9


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _kept_values(form: FormData, ids: Sequence[str]) -> dict[str, Any]:
    """What the labeler entered, to show again when the form is refused."""
    return {
        "ranks": {cid: _text(form, f"rank_{cid}") for cid in ids},
        "overall": {cid: _text(form, f"overall_{cid}") for cid in ids},
        "flags": {cid: [v for v in form.getlist(f"flag_{cid}") if isinstance(v, str)] for cid in ids},
        "demonstration": _text(form, "demonstration"),
        "comment": _text(form, "comment"),
    }


def _version(form: FormData) -> int | None:
    """The form's policy version: a whole number >= 0, else None."""
    text = _text(form, "version").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def _valid_request_id(text: str) -> str | None:
    try:
        return check_request_id(text)
    except FormProblem:
        return None


def create_app(config: WebConfig) -> Starlette:
    """The ASGI app: routes, the body limit and the security headers."""
    web = WebApp(config)
    app = Starlette(routes=web.routes(), lifespan=web.lifespan, middleware=[
        Middleware(SecurityHeaders, https=config.https),  # type: ignore[arg-type]
        Middleware(BodyLimit, max_bytes=config.max_body_bytes),  # type: ignore[arg-type]
    ])  # fmt: skip
    app.state.web = web
    return app


# ---------------------------------------------------------------- `rlhf web`


def parse_args(argv: Sequence[str]) -> WebConfig:
    """`rlhf web` flags -> WebConfig (one flag per field, with its help)."""
    defaults = WebConfig()
    parser = argparse.ArgumentParser(prog="rlhf web", description="Serve the labeling web app.")
    for f in dataclasses.fields(WebConfig):
        default = getattr(defaults, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata.get("help", ""))
            continue
        kind = Path if default is None else type(default)
        parser.add_argument(flag, dest=f.name, type=kind, default=default,
                            help=f"{f.metadata.get('help', '')} (default: {default})")  # fmt: skip
    return WebConfig(**vars(parser.parse_args(list(argv))))


def url_of(config: WebConfig, port: int) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{'https' if config.https else 'http'}://{host}:{port}/"


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve(config: WebConfig, announce: Any = print) -> None:
    """Serve until SIGINT/SIGTERM; `announce` gets the URL once the app answers."""
    import uvicorn

    sock = bind_socket(config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), log_level="info", proxy_headers=False, server_header=False,
        ssl_certfile=config.https_cert, ssl_keyfile=config.https_key))  # fmt: skip
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        announce(f"rlhf web: labeling at {url_of(config, sock.getsockname()[1])} (rlhf server {config.server})")
    await task


def main(argv: Sequence[str] | None = None) -> int:
    """`rlhf web`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"rlhf web: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, lambda line: print(line, flush=True)))
    except OSError as err:
        print(f"rlhf web: cannot listen on {config.host}:{config.port}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
