"""PII at ingest: every prompt (ALL turns of a chat: system, user, assistant) and every
completion is scanned by ``common.pii`` as the server logs it, and flagged.

Modes (``ServerConfig.pii_ingest``):

- ``flag`` (default): rows are stored as written, with ``has_pii = 1``. A flagged PROMPT
  gets no ``redacted_text``, so it is never handed to a labeler (the queue skips flagged
  prompts without one), never trains (hygiene drops it) and is left out of redacted and
  training exports. A flagged COMPLETION gets its ``redacted_text``: that is what a
  labeler is shown, the reward models train on and training exports carry.
- ``redact``: only redacted text is stored (text, every chat turn, the dedup key,
  ``redacted_text``), so the original never reaches the disk; ``has_pii = 1`` still marks
  the row. The caller still receives its completions as generated; a replayed answer
  (a retry with the same request_id) is read from the store, so it is the redacted one.

Scanning costs tens of microseconds for a typical prompt or completion (see
docs/ARCHITECTURE.md "Data hygiene"); the completion log runs it off the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from common.pii import DEFAULT_PHONE_REGION, find_pii, messages_have_pii, redact_matches, redact_messages, redact_pii
from common.store import Completion, NewCompletion
from server.config import PII_INGEST_MODES, PiiIngestMode


@dataclass(frozen=True)
class ScannedPrompt:
    """A prompt as it will be stored: possibly redacted text and turns, and its flag."""

    text: str
    messages: list[dict[str, str]] | None
    has_pii: bool
    redacted_text: str | None


@dataclass(frozen=True)
class PiiIngest:
    """The server's ingest policy (module docstring): a mode and the phone region."""

    mode: PiiIngestMode = "flag"
    region: str = DEFAULT_PHONE_REGION

    def __post_init__(self) -> None:
        if self.mode not in PII_INGEST_MODES:
            raise ValueError(f"Unknown PII ingest mode: {self.mode!r} (expected one of {PII_INGEST_MODES})")

    def prompt(self, text: str, messages: Sequence[Mapping[str, str]] | None) -> ScannedPrompt:
        """Scan the text and every turn; in redact mode return them redacted."""
        turns = [dict(m) for m in messages] if messages is not None else None
        flagged = bool(find_pii(text, self.region)) or messages_have_pii(turns or (), self.region)
        if not flagged:
            return ScannedPrompt(text, turns, False, None)
        if self.mode == "flag":
            return ScannedPrompt(text, turns, True, None)
        redacted = redact_pii(text, self.region)
        return ScannedPrompt(redacted, None if turns is None else redact_messages(turns, self.region), True, redacted)

    def completion(self, sample: NewCompletion) -> NewCompletion:
        """The sample flagged, with its redacted text; in redact mode its text redacted too."""
        matches = find_pii(sample.text, self.region)
        if not matches:
            return sample
        redacted = redact_matches(sample.text, matches)
        text = redacted if self.mode == "redact" else sample.text
        return dataclasses.replace(sample, text=text, has_pii=True, redacted_text=redacted)

    def as_stored(self, completion: Completion) -> Completion:
        """A completion as its row holds it (in redact mode: the redacted text)."""
        if self.mode == "redact" and completion.has_pii and completion.redacted_text is not None:
            return dataclasses.replace(completion, text=completion.redacted_text)
        return completion
