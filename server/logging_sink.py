"""Completion logging: every prompt and sample goes to the store, acknowledged after commit.

`CompletionLog` writes through the store's single writer thread (off the event loop) and
returns only once the transaction committed, so the servicer answers a sample only after
its row is durable: a crash may lose an unanswered request, never an answered one's
record. The prompt row is written with the request's first finished sample (one
transaction, not two); an idempotent request's answer is recorded in the same
transaction as its last sample, so a retry finds either everything or nothing.

Samples whose caller went away (cancelled, deadline passed) are still logged, with
finish_reason "abort", by a background write nobody waits for except `drain()`.

PII: every prompt (all turns of a chat) and every sample is scanned before its write
(`server.pii_ingest`: flagged, and in "redact" mode stored redacted only); the scan runs
in a worker thread, off the event loop and off the single writer. The caller always gets
its samples as generated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from common.store import (
    Completion,
    NewCompletion,
    Store,
    add_completions,
    add_prompt,
    lookup_idempotent,
    record_idempotent,
)
from common.store.errors import ConflictError
from common.store.records import PromptSource
from server.pii_ingest import PiiIngest, ScannedPrompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt as it will be logged. `text` is the plain prompt or the last user turn;
    `messages` the whole conversation when the caller sent one."""

    prompt_id: str
    user_id: str
    text: str
    messages: list[dict[str, str]] | None = None
    source: PromptSource = "traffic"
    request_id: str | None = None


@dataclass(frozen=True)
class IdempotencyKey:
    """(caller, method, request_id) and the hash of the payload sent under it."""

    caller_id: str
    method: str
    request_id: str
    payload_sha256: str


# Builds the serialized response from all of the request's logged completions.
ResponseBuilder = Callable[[list[Completion]], bytes]


class CompletionLog:
    """Writes prompts and completions to the store (see the module docstring)."""

    def __init__(self, store: Store, pii: PiiIngest | None = None) -> None:
        self._store = store
        self.pii = pii or PiiIngest()
        self._background: set[asyncio.Task[None]] = set()

    async def replay(self, key: IdempotencyKey) -> bytes | None:
        """The recorded answer of an earlier call with this request_id, or None.
        ConflictError when the id was used before with a different payload."""
        record = await self._store.read(lookup_idempotent(key.caller_id, key.method, key.request_id))
        if record is None:
            return None
        if record.payload_sha256 != key.payload_sha256:
            raise ConflictError(
                f"request_id {key.request_id!r} was already used with a different request; "
                "use a new request_id for a new request"
            )
        return record.response

    async def write_samples(
        self,
        prompt: PromptRecord,
        samples: Sequence[NewCompletion],
        *,
        with_prompt: bool,
        answer: tuple[IdempotencyKey, ResponseBuilder, list[Completion]] | None = None,
    ) -> list[Completion]:
        """Commit `samples` (and the prompt row when `with_prompt`); return them as stored.

        `answer`: for the request's last write, the idempotency key, a builder of the
        serialized response, and the completions committed by earlier writes; the answer
        is recorded in the same transaction. The prompt and samples are scanned for PII
        first (module docstring); the returned completions carry the text as generated.
        """
        samples = list(samples)
        scanned, to_store = await asyncio.to_thread(self._scan, prompt, samples, with_prompt)
        stored = await self._store.write(_samples_op(prompt, scanned, to_store, answer, self.pii))
        return [dataclasses.replace(c, text=s.text) for c, s in zip(stored, samples, strict=True)]

    def _scan(self, prompt: PromptRecord, samples: list[NewCompletion],
              with_prompt: bool) -> tuple[ScannedPrompt | None, list[NewCompletion]]:  # fmt: skip
        """The prompt (when it is to be written) and the samples as they will be stored."""
        scanned = self.pii.prompt(prompt.text, prompt.messages) if with_prompt else None
        return scanned, [self.pii.completion(s) for s in samples]

    def in_background(self, write: Coroutine[Any, Any, Any], what: str) -> None:
        """Run a log write nobody waits for (an abandoned request's samples); failures
        are logged, and `drain()` waits for it before the store closes."""
        task = asyncio.get_running_loop().create_task(self._quietly(write, what), name=what)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quietly(write: Coroutine[Any, Any, Any], what: str) -> None:
        try:
            await write
        except Exception:
            log.exception("background log write failed: %s", what)

    async def drain(self) -> None:
        """Wait for the background writes (call before closing the store)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


def _samples_op(
    prompt: PromptRecord,
    scanned: ScannedPrompt | None,
    samples: list[NewCompletion],
    answer: tuple[IdempotencyKey, ResponseBuilder, list[Completion]] | None,
    pii: PiiIngest,
) -> Callable[[Database], list[Completion]]:
    """`scanned`: the prompt as it is stored (None: already written)."""

    def op(db: Database) -> list[Completion]:
        if scanned is not None:
            add_prompt(prompt.user_id, scanned.text, source=prompt.source, messages=scanned.messages,
                       has_pii=scanned.has_pii, redacted_text=scanned.redacted_text,
                       request_id=prompt.request_id, prompt_id=prompt.prompt_id)(db)  # fmt: skip
        stored = add_completions(prompt.prompt_id, samples)(db) if samples else []
        if answer is not None:
            key, build, earlier = answer
            # The recorded answer is on disk too: it holds the texts as stored.
            response = build(sorted([pii.as_stored(c) for c in earlier] + stored, key=lambda c: c.idx))
            record_idempotent(key.caller_id, key.method, key.request_id, key.payload_sha256, response)(db)
        return stored

    return op
