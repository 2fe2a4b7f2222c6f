"""Server-side sessions: the signed-in labeler's API key lives here and nowhere else.

The browser holds only a random session id (32 bytes, `secrets`) in an HttpOnly,
SameSite=Strict cookie. A session also holds its CSRF token (rendered into every form and
compared with `hmac.compare_digest`), the task leased for it and the request_id of that
lease (so a reload shows the same task instead of leasing another), the tasks it answered
lately (so a replayed form is recognised and answered again from the server's idempotency
records) and a one-shot message for the next page. Sessions live in this process's memory:
a restart signs everyone out, which costs a sign-in and loses nothing (a leased task
goes back to the queue when its lease ends).

Before sign-in there is no session, so the sign-in form is protected by a pre-session
token: a random nonce in its own cookie, and the form carries HMAC(app secret, nonce). A
page on another site can neither read the nonce nor compute the HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from rlhf.v1 import feedback_pb2

RECENT_TASKS = 8


@dataclass
class Session:
    """One signed-in browser. `api_key` is never rendered, logged or repr'd."""

    id: str = field(repr=False)
    api_key: str = field(repr=False)
    user_id: str
    role: str
    labeler_group: str
    csrf_token: str = field(repr=False)
    last_seen: float
    task: feedback_pb2.ComparisonTask | None = field(default=None, repr=False)
    lease_request_id: str | None = None
    recent_tasks: OrderedDict[str, feedback_pb2.ComparisonTask] = field(default_factory=OrderedDict, repr=False)
    notice: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC call metadata that makes a call this labeler's."""
        return (("authorization", f"Bearer {self.api_key}"),)

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf_token.encode())

    def find_task(self, task_id: str) -> feedback_pb2.ComparisonTask | None:
        """The leased task, or one answered lately (a replayed form), by id."""
        if self.task is not None and self.task.task_id == task_id:
            return self.task
        return self.recent_tasks.get(task_id)

    def task_answered(self, task: feedback_pb2.ComparisonTask) -> None:
        """The task is closed: forget its lease (the next page leases a new one)."""
        if self.task is not None and self.task.task_id == task.task_id:
            self.task, self.lease_request_id = None, None
        self.recent_tasks[task.task_id] = task
        self.recent_tasks.move_to_end(task.task_id)
        while len(self.recent_tasks) > RECENT_TASKS:
            self.recent_tasks.popitem(last=False)

    def pop_notice(self) -> str | None:
        notice, self.notice = self.notice, None
        return notice


class SessionStore:
    """In-memory sessions with an idle timeout and a cap (least recently used evicted)."""

    def __init__(self, idle_seconds: float, max_sessions: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle = idle_seconds
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, api_key: str, user_id: str, role: str, labeler_group: str) -> Session:
        self._drop_idle()
        session = Session(id=secrets.token_urlsafe(32), api_key=api_key, user_id=user_id, role=role,
                          labeler_group=labeler_group, csrf_token=secrets.token_urlsafe(32),
                          last_seen=self._clock())  # fmt: skip
        self._sessions[session.id] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle clock restarts), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self._idle:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def delete(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _drop_idle(self) -> None:
        cutoff = self._clock() - self._idle
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.last_seen >= cutoff:
                break
            self._sessions.popitem(last=False)


class LoginTokens:
    """The sign-in form's CSRF protection, before any session exists (module docstring)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(32)

    def form_token(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def check(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(self.form_token(nonce).encode(), token.encode())
