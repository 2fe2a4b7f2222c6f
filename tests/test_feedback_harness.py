"""Helpers shared by the Feedback tests (no tests here): a real grpc.aio server with the
FeedbackServicer on 127.0.0.1, port 0, in a background thread with its own event loop;
API keys; prompts with logged completions seeded straight into the store."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Callable

import grpc
from sqlite_utils import Database

from common.identity import generate_api_key, hash_api_key, split_for_user
from common.store import NewCompletion, Store, add_api_key, add_completions, add_prompt
from rlhf.v1 import feedback_pb2_grpc
from server.app import FEEDBACK, server_deps
from server.config import ServerConfig
from server.engines.base import Engine


class FeedbackServerThread:
    """`with FeedbackServerThread(store_path, engine_factory) as server:` serves until exit.

    The servicer is added as the real server adds it (`server.app.FEEDBACK`), on deps
    built from a ServerConfig whose labeling fields are `k_default` (label_k),
    `max_new_tokens` (label_max_new_tokens) and `lease_seconds` (label_lease_seconds).
    `server.store` is the server's own Store (thread-safe: tests seed rows through it);
    `server.target` is "127.0.0.1:<port>".
    """

    def __init__(self, store_path: Path, engine_factory: Callable[[], Engine], *, k_default: int = 4,
                 max_new_tokens: int = 128, lease_seconds: float = 600.0) -> None:
        self.store_path = store_path
        self.engine_factory = engine_factory
        self.config = ServerConfig(store_path=store_path, label_k=k_default, label_max_new_tokens=max_new_tokens,
                                   label_lease_seconds=lease_seconds)
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="feedback-server", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FeedbackServerThread:
        self._thread.start()
        self._ready.wait(timeout=300)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise TimeoutError("the feedback server did not start in 300 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # surfaced by __enter__
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.store = Store(self.store_path)
        self.engine = self.engine_factory()
        await self.engine.start()
        deps = server_deps(self.config, self.engine, self.store)
        deps.engine_ready.set()
        server = grpc.aio.server()
        FEEDBACK.add_to_server(deps, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(grace=1)
            await self.engine.shutdown()
            self.store.close()


def issue_key(store: Store, user_id: str, role: str = "labeler", group: str | None = "train") -> str:
    """A fresh API key for `user_id` with `role` (stored hashed, as `rlhf keys` does)."""
    key = generate_api_key()
    store.write_sync(add_api_key(user_id, role, hash_api_key(key), labeler_group=group))  # type: ignore[arg-type]
    return key


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def user_in_split(split: str, prefix: str = "user") -> str:
    """The first user id `<prefix>-<i>` that `split_for_user` puts in `split`."""
    return next(f"{prefix}-{i}" for i in range(10_000) if split_for_user(f"{prefix}-{i}") == split)


def seed_prompt(store: Store, n_completions: int, *, user_id: str | None = None, text: str = "Say something nice.",
                version: int = 0, has_pii: bool = False, redacted_text: str | None = None,
                now: float | None = None) -> tuple[str, list[str]]:  # fmt: skip
    """A logged prompt with `n_completions` served completions; (prompt id, completion ids)."""
    user_id = user_id or user_in_split("train")
    samples = [
        NewCompletion(idx=i, text=f"answer {i} to {text}", policy_version=version, finish_reason="stop",
                      prompt_tokens=5, completion_tokens=4, latency_s=0.1, purpose="serve")
        for i in range(n_completions)
    ]  # fmt: skip

    def op(db: Database) -> tuple[str, list[str]]:
        prompt = add_prompt(user_id, text, has_pii=has_pii, redacted_text=redacted_text, now=now)(db)
        return prompt.id, [c.id for c in add_completions(prompt.id, samples, now=now)(db)]

    return store.write_sync(op)


def count_rows(store: Store, *tables: str) -> dict[str, int]:
    return store.read_sync(lambda db: {t: db.table(t).count for t in tables})


def stub(server: FeedbackServerThread) -> tuple[grpc.Channel, feedback_pb2_grpc.FeedbackStub]:
    channel = grpc.insecure_channel(server.target)
    return channel, feedback_pb2_grpc.FeedbackStub(channel)
