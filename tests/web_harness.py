"""The web app for tests, on real parts: a real rlhf server (`server_harness.ServerThread`,
the tiny model, a real store file), the app served by uvicorn on a real loopback port in
a thread of its own, keys and prompts seeded into the store, and the store's rows read
back through a separate read-only SQLite connection.

    with WebStack.start(tmp_path, tiny_model_dir) as stack:
        stack.waiting_prompt("Name a colour.")
        ... httpx or a browser against stack.url ...
        stack.rows("SELECT * FROM rankings")
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from sqlite_utils import Database

from common.store import add_prompt, lease_task
from server_harness import ServerThread, server_config
from test_feedback_harness import issue_key, seed_prompt, user_in_split
from webapp.app import bind_socket, create_app
from webapp.config import WebConfig

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
HIDDEN = re.compile(r'<input type="hidden" name="(request_id|task_id)" value="([^"]*)"')
RANK = re.compile(r'name="rank_([^"]+)"')
# What "the store holds nothing new" is checked on.
FEEDBACK_COUNTS = ("SELECT (SELECT COUNT(*) FROM rankings) AS rankings, (SELECT COUNT(*) FROM ratings) AS ratings, "
                   "(SELECT COUNT(*) FROM demonstrations) AS demonstrations, "
                   "(SELECT COUNT(*) FROM comparison_tasks WHERE status IN ('submitted', 'declined')) AS closed_tasks")


@dataclass
class WebThread:
    """`create_app(config)` served by uvicorn on 127.0.0.1 (a free port) in a thread."""

    config: WebConfig
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _ready: Future[None] = field(default_factory=Future)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> WebThread:
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(create_app(self.config), log_level="warning"))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve(sock)), name="web-app", daemon=True)
        self._thread.start()
        self._ready.result(timeout)
        return self

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started and not task.done():
            await asyncio.sleep(0.02)
        if task.done():
            self._ready.set_exception(RuntimeError("the web app did not start"))
        else:
            self._ready.set_result(None)
        await task

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)

    def __enter__(self) -> WebThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class WebStack:
    """A server, the web app talking to it, and keys: labelers ana (group A) and ben (B),
    the admin ops and the user-role key of cleo."""

    server: ServerThread
    web: WebThread
    keys: dict[str, str]

    @classmethod
    def start(cls, folder: Path, model_dir: Path, **web_options: Any) -> WebStack:
        server = ServerThread(server_config(folder, model_dir, label_max_new_tokens=6, label_k=4)).start()
        try:
            store = server.store
            assert store is not None
            keys = {"ana": issue_key(store, "ana", "labeler", "A"), "ben": issue_key(store, "ben", "labeler", "B"),
                    "ops": issue_key(store, "ops", "admin", None), "cleo": issue_key(store, "cleo", "user", None)}
            web = WebThread(WebConfig(server=server.target, port=0, **web_options)).start()
        except BaseException:
            server.stop()
            raise
        return cls(server, web, keys)

    def close(self) -> None:
        self.web.stop()
        self.server.stop()

    def __enter__(self) -> WebStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return self.web.url

    @property
    def store_path(self) -> Path:
        return self.server.config.store_path

    # ------------------------------------------------------------ the store

    def retire_all(self) -> None:
        """An empty queue: earlier prompts move to the test split (never labeled) and leases end."""

        def retire(db: Database) -> None:
            db.execute("UPDATE prompts SET split = 'test'")
            db.execute("UPDATE comparison_tasks SET status = 'expired' WHERE status = 'leased'")

        self.server.store.write_sync(retire)  # type: ignore[union-attr]

    def waiting_prompt(self, text: str = "Name a colour.", messages: Sequence[dict[str, str]] | None = None) -> str:
        """A train-split prompt for the queue; its id."""
        prompt = self.server.store.write_sync(add_prompt(user_in_split("train"), text, messages=messages))  # type: ignore[union-attr]
        return prompt.id

    def prompt_with_completions(self, text: str, completions: Sequence[str]) -> tuple[str, list[str]]:
        """A prompt whose next lease shows exactly `completions`: they are logged for it and
        named by an expired task, whose completions the queue reuses (same policy version)."""
        prompt_id, ids = seed_prompt(self.server.store, len(completions), text=text)  # type: ignore[arg-type]

        def write(db: Database) -> None:
            for cid, body in zip(ids, completions):
                db.execute("UPDATE completions SET text = ? WHERE id = ?", [body, cid])
            task = lease_task(prompt_id, "nobody", ids, 1.0, now=time.time() - 60)(db)
            db.execute("UPDATE comparison_tasks SET status = 'expired' WHERE id = ?", [task.id])

        self.server.store.write_sync(write)  # type: ignore[union-attr]
        return prompt_id, ids

    def expire(self, task_id: str) -> None:
        self.server.store.write_sync(lambda db: db.execute(  # type: ignore[union-attr]
            "UPDATE comparison_tasks SET expires_at = ? WHERE id = ?", [time.time() - 1, task_id]))

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows read through a separate read-only connection (what was committed)."""
        conn = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, list(params)).fetchall()]
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        return self.rows(FEEDBACK_COUNTS)[0]

    def task(self, task_id: str) -> dict[str, Any]:
        (row,) = self.rows("SELECT * FROM comparison_tasks WHERE id = ?", [task_id])
        return row

    def ranking_of(self, task_id: str) -> list[list[str]]:
        (row,) = self.rows("SELECT ranking_json FROM rankings WHERE task_id = ?", [task_id])
        return json.loads(row["ranking_json"])


def form_fields(page: str) -> dict[str, Any]:
    """The labeling form's hidden fields and completion ids (in the page's order)."""
    fields = dict(HIDDEN.findall(page))
    match = CSRF.search(page)
    fields["csrf"] = match.group(1) if match else ""
    fields["completion_ids"] = RANK.findall(page)
    return fields
