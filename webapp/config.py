"""`WebConfig`: every knob of `rlhf web`, declared once, validated at construction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from common.store.rankings import LABEL_MAX_K, LABEL_MIN_K

MAX_DEMONSTRATION_CHARS = 32768  # the server's limit (Feedback.SubmitDemonstration)
MAX_COMMENT_CHARS = 4096  # the contract's limit on a rating's or a decline's comment


@dataclass(frozen=True)
class WebConfig:
    """Where the web app listens, which gRPC server it talks to, and its limits."""

    server: str = field(default="127.0.0.1:50051", metadata={"help": "host:port of the rlhf gRPC server"})
    host: str = field(default="127.0.0.1", metadata={"help": "address the web app binds (loopback by default)"})
    port: int = field(default=8080, metadata={"help": "port the web app binds (0: any free port)"})
    guidelines: Path | None = field(
        default=None, metadata={"help": "Markdown file shown as the labeling guidelines (default: the built-in ones)"})
    server_root_cert: Path | None = field(
        default=None, metadata={"help": "PEM file to trust when the gRPC server uses TLS (a private CA or self-signed)"})
    server_tls: bool = field(default=False, metadata={"help": "reach the gRPC server over TLS with the system roots"})
    https_cert: Path | None = field(default=None, metadata={"help": "serve the web app over HTTPS with this certificate"})
    https_key: Path | None = field(default=None, metadata={"help": "the private key of https_cert"})
    allow_plain_http: bool = field(
        default=False, metadata={"help": "allow a non-loopback bind without HTTPS (keys would cross the network in clear)"})
    session_idle_seconds: float = field(
        default=3600.0, metadata={"help": "a session unused this long is deleted (the labeler signs in again)"})
    max_sessions: int = field(default=10_000, metadata={"help": "sessions held at once; the least recently used goes first"})
    max_body_bytes: int = field(default=256 * 1024, metadata={"help": "largest request body (a form) the app reads"})
    k: int = field(default=0, metadata={"help": f"completions per task, {LABEL_MIN_K}..{LABEL_MAX_K} (0: the server's default)"})
    rpc_timeout_seconds: float = field(
        default=300.0, metadata={"help": "deadline of each gRPC call (NextComparison samples K completions)"})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in 0..65535, got {self.port}")
        if (self.https_cert is None) != (self.https_key is None):
            raise ValueError("HTTPS needs both https_cert and https_key (or neither)")
        if self.k and not LABEL_MIN_K <= self.k <= LABEL_MAX_K:
            raise ValueError(f"k must be 0 or {LABEL_MIN_K}..{LABEL_MAX_K}, got {self.k}")
        if self.session_idle_seconds <= 0 or self.max_sessions < 1 or self.rpc_timeout_seconds <= 0:
            raise ValueError("session_idle_seconds, max_sessions and rpc_timeout_seconds must be positive")
        if self.max_body_bytes < 4096:
            raise ValueError(f"max_body_bytes must be >= 4096, got {self.max_body_bytes}")
        if self.guidelines is not None and not Path(self.guidelines).is_file():
            raise ValueError(f"guidelines file not found: {self.guidelines}")
        if not (self.https or self.allow_plain_http or is_loopback(self.host)):
            raise ValueError(f"binding {self.host!r} without HTTPS would send API keys and session cookies in clear: "
                             "give --https-cert/--https-key, or --allow-plain-http behind a TLS-terminating proxy")

    @property
    def https(self) -> bool:
        return self.https_cert is not None


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback literals (127.0.0.0/8, ::1); every other name, and
    "" / "0.0.0.0" / "::" (all interfaces), is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
