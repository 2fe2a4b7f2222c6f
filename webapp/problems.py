"""gRPC errors from the server, said in words a labeler can act on, with an HTTP status."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

import grpc

Code = grpc.StatusCode
_RETRY_IN = re.compile(r"retry in ([0-9.]+) ?s")


@dataclass(frozen=True)
class Problem:
    status: int
    message: str


def retry_seconds(err: grpc.aio.AioRpcError) -> float | None:
    """When the server says to retry: its `retry-after-ms` trailer, else "retry in N s"."""
    for key, value in err.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return int(value) / 1000
            except ValueError:
                break
    match = _RETRY_IN.search(err.details() or "")
    return float(match.group(1)) if match else None


def explain(err: grpc.aio.AioRpcError, server: str) -> Problem:
    """The status and message for an error of any call (NOT_FOUND and FAILED_PRECONDITION
    of the labeling calls get their own wording where they are handled)."""
    code, details = err.code(), err.details() or ""
    if code == Code.UNAVAILABLE:
        return Problem(503, f"The rlhf server at {server} is unreachable right now ({_first_line(details)}). "
                            "Try again in a moment: submitting the same form again stores nothing twice.")
    if code == Code.RESOURCE_EXHAUSTED:
        wait = retry_seconds(err)
        when = f"in {wait:.1f} s" if wait is not None else "in a few seconds"
        return Problem(429, f"Slow down: the server limits how fast one key may work ({details}). Try again {when}.")
    if code == Code.DEADLINE_EXCEEDED:
        return Problem(504, "The server did not answer in time. Try again: submitting the same form again stores "
                            "nothing twice.")
    if code == Code.UNAUTHENTICATED:
        return Problem(401, f"The server no longer accepts your key ({details}). Sign in again.")
    if code == Code.PERMISSION_DENIED:
        return Problem(403, f"The server refused: {details}.")
    if code == Code.INVALID_ARGUMENT:
        return Problem(400, f"The server refused the form: {details}.")
    if code == Code.ALREADY_EXISTS:
        return Problem(409, "This form was already submitted with other values; nothing new was stored. "
                            "Reload the page for a fresh form.")
    if code == Code.UNIMPLEMENTED:
        return Problem(501, f"The server at {server} does not offer this call yet (it runs an older version): {details}")
    return Problem(502, f"The server answered {code.name}: {details}")


def utc_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%H:%M:%S UTC")


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no answer"
    return line if len(line) <= 200 else line[:200] + "…"
