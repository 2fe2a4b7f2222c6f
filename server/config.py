"""`ServerConfig`: every knob of `rlhf serve`, declared once, validated at construction.

Defaults are the documented limits; `rlhf serve --help` lists the same fields. The
server unpacks the config at its edge (`server.app.build_server`); inner code takes the
plain values it needs (`RequestLimits` for the request checks).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from common import paths
from common.store.rankings import LABEL_MAX_K, LABEL_MIN_K
from server.engines.base import SWAP_MODES

EngineKind = Literal["auto", "vllm", "hf"]
ENGINE_KINDS: tuple[str, ...] = ("auto", "vllm", "hf")
PiiIngestMode = Literal["flag", "redact"]
PII_INGEST_MODES: tuple[str, ...] = ("flag", "redact")


@dataclass(frozen=True)
class RequestLimits:
    """What one Generate request may ask for. Checked by `server.limits` before the engine
    sees anything; the values are also reported by `Inference.GetModel`."""

    max_prompt_tokens: int = field(
        default=1024, metadata={"help": "prompt length in tokens, chat template applied"}
    )
    max_new_tokens_limit: int = field(
        default=512, metadata={"help": "largest max_new_tokens a request may ask for"}
    )
    default_max_new_tokens: int = field(
        default=128, metadata={"help": "max_new_tokens when a request leaves it 0"}
    )
    max_n: int = field(default=9, metadata={"help": "samples per request (the proto says 1..9)"})
    max_temperature: float = field(default=2.0, metadata={"help": "temperature upper bound"})
    max_stop_strings: int = field(default=8, metadata={"help": "stop strings per request"})
    max_stop_chars: int = field(default=256, metadata={"help": "characters per stop string"})
    max_request_id_chars: int = field(default=128, metadata={"help": "request_id length"})
    max_prompt_chars: int = field(
        default=65536,
        metadata={"help": "characters of prompt text, checked before tokenizing (cheap guard)"},
    )

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_new_tokens_limit", "default_max_new_tokens",
                     "max_n", "max_stop_chars", "max_request_id_chars", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must lie in "
                f"1..max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        if self.max_n > 9:
            raise ValueError(f"max_n must be <= 9 (the contract's limit), got {self.max_n}")
        if self.max_temperature <= 0:
            raise ValueError(f"max_temperature must be > 0, got {self.max_temperature}")


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of one server process. Paths default under `$RLHF_DATA_DIR`."""

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "bind address; a non-loopback one needs API keys in the store"},
    )
    port: int = field(default=50051, metadata={"help": "gRPC port; 0 picks a free one"})
    tls_cert: Path | None = field(default=None, metadata={"help": "PEM certificate chain (TLS on)"})
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of tls_cert"})
    engine: EngineKind = field(
        default="auto", metadata={"help": "auto (vllm where it imports, else hf) | vllm | hf"}
    )
    swap_mode: str = field(
        default="auto",
        metadata={"help": "how a hot swap treats requests in flight: 'drain' (they finish on the old weights; new "
                          "requests wait), 'keep' (vLLM: they freeze, then continue on the new weights, recorded "
                          "with both versions; the stall is the reload), 'adapter' (vLLM: a policy trained as LoRA "
                          "adapters on the served base is loaded beside the current one, nothing waits or mixes; "
                          "other checkpoints drain; costs throughput), 'auto' (keep on vLLM, drain on HF)"},
    )
    swap_drain_timeout_s: float = field(
        default=30.0, metadata={"help": "the longest a 'drain' swap waits; requests still running then continue "
                                        "on the new weights (vLLM, recorded with both versions) or are waited for (HF)"}
    )
    store_path: Path = field(
        default_factory=lambda: paths.data_dir() / "rlhf.sqlite",
        metadata={"help": "the SQLite store"},
    )
    checkpoints_root: Path = field(
        default_factory=lambda: paths.data_dir() / "checkpoints",
        metadata={"help": "folder of published checkpoints vN/"},
    )
    base_model_dir: Path = field(
        default_factory=paths.embedded_model_dir,
        metadata={"help": "model folder published as v0 when the store has no serving policy"},
    )
    base_model_name: str = field(
        default=paths.EMBEDDED_MODEL_NAME, metadata={"help": "name recorded in v0's manifest"}
    )
    grace_seconds: float = field(
        default=10.0, metadata={"help": "SIGTERM/SIGINT: seconds in-flight requests may finish"}
    )
    metrics_port: int = field(
        default=0, metadata={"help": "Prometheus /metrics HTTP port; 0 = off (HTTPS with tls_cert when TLS is on)"}
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata={"help": "address /metrics binds: loopback whatever host is; 0.0.0.0 lets other machines scrape it"},
    )
    max_receive_message_bytes: int = field(
        default=1 << 20, metadata={"help": "largest request message gRPC accepts"}
    )
    max_concurrent_per_key: int = field(
        default=8, metadata={"help": "generations in flight per API key, served and labeling (open mode: per user)"}
    )
    requests_per_second: float = field(
        default=500.0, metadata={"help": "RPCs each API key may start per second, all services (token bucket); 0 = no limit"}
    )
    request_burst: int = field(
        default=1000, metadata={"help": "RPCs a key may start at once before requests_per_second applies (bucket size)"}
    )
    tokens_per_minute: float = field(
        default=600_000.0, metadata={"help": "tokens each API key may generate per minute, served and labeling "
                                             "(max_new_tokens x n reserved up front, the unused part refunded); 0 = no limit"}
    )
    token_burst: int = field(
        default=65_536, metadata={"help": "tokens a key may reserve at once (bucket size); must hold the largest "
                                          "request, max_new_tokens_limit x max_n, and a K = 9 labeling task"}
    )
    key_cache_seconds: float = field(
        default=2.0, metadata={"help": "seconds a found API key is remembered (a revoked key works that long); 0 = off"}
    )
    label_k: int = field(
        default=4, metadata={"help": f"completions per labeling task when NextComparison leaves k 0 ({LABEL_MIN_K}..{LABEL_MAX_K})"}
    )
    label_max_new_tokens: int = field(
        default=128, metadata={"help": "max_new_tokens of the K completions sampled for a labeling task"}
    )
    label_lease_seconds: float = field(
        default=600.0, metadata={"help": "seconds a labeling task stays leased before it is handed out again"}
    )
    label_overlap_share: float = field(
        default=0.1, metadata={"help": "share of prompts (0..1, fixed per prompt by the sha256 of its id) whose first "
                                       "ranked completion set is given to label_overlap_labelers labelers, for agreement"}
    )
    label_overlap_labelers: int = field(
        default=2, metadata={"help": "different labelers who rank a shared prompt's completion set (2..5)"}
    )
    label_gold_share: float = field(
        default=0.05, metadata={"help": "chance (0..1) that a labeling request gets a gold task, when one waits "
                                        "for this labeler (Admin.SetGoldRanking sets them)"}
    )
    label_gold_min_agreement: float = field(
        default=0.6, metadata={"help": "a labeler whose share of gold pairs ordered as the gold ranking does is "
                                       "below this (0..1) is flagged in Admin.GetLabelerQuality"}
    )
    label_gold_min_tasks: int = field(
        default=3, metadata={"help": "gold tasks a labeler must have ranked before label_gold_min_agreement flags them"}
    )
    pii_ingest: PiiIngestMode = field(
        default="flag",
        metadata={"help": "PII in a logged prompt (any chat turn) or completion: 'flag' it (stored as written, "
                          "kept from labelers and training), or 'redact': store only the redacted text"},
    )
    pii_phone_region: str = field(
        default="US", metadata={"help": "region (ISO 3166 alpha-2) whose national phone formats count as PII"}
    )
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"Unknown engine: {self.engine!r} (expected one of {ENGINE_KINDS})")
        if self.swap_mode not in SWAP_MODES:
            raise ValueError(f"Unknown swap_mode: {self.swap_mode!r} (expected one of {SWAP_MODES})")
        if self.swap_drain_timeout_s <= 0:
            raise ValueError(f"swap_drain_timeout_s must be > 0, got {self.swap_drain_timeout_s}")
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"ports must lie in 0..65535, got {self.port} and {self.metrics_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither)")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.max_receive_message_bytes < 1024:
            raise ValueError(
                f"max_receive_message_bytes must be >= 1024, got {self.max_receive_message_bytes}"
            )
        if self.max_concurrent_per_key < 1:
            raise ValueError(
                f"max_concurrent_per_key must be >= 1, got {self.max_concurrent_per_key}"
            )
        if self.key_cache_seconds < 0:
            raise ValueError(f"key_cache_seconds must be >= 0, got {self.key_cache_seconds}")
        if not LABEL_MIN_K <= self.label_k <= LABEL_MAX_K:
            raise ValueError(f"label_k must lie in {LABEL_MIN_K}..{LABEL_MAX_K} (the paper's K), got {self.label_k}")
        self._check_rates()
        if self.label_max_new_tokens < 1 or self.label_lease_seconds <= 0:
            raise ValueError(f"label_max_new_tokens must be >= 1 and label_lease_seconds > 0, got "
                             f"{self.label_max_new_tokens} and {self.label_lease_seconds}")
        self._check_label_quality()
        if self.pii_ingest not in PII_INGEST_MODES:
            raise ValueError(f"Unknown pii_ingest: {self.pii_ingest!r} (expected one of {PII_INGEST_MODES})")
        from common.pii import check_phone_region  # phonenumbers' import, only where a server is configured

        check_phone_region(self.pii_phone_region)

    def _check_label_quality(self) -> None:
        for name in ("label_overlap_share", "label_gold_share", "label_gold_min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in 0..1, got {getattr(self, name)}")
        if not 2 <= self.label_overlap_labelers <= 5:
            raise ValueError(f"label_overlap_labelers must lie in 2..5, got {self.label_overlap_labelers}")
        if self.label_gold_min_tasks < 1:
            raise ValueError(f"label_gold_min_tasks must be >= 1, got {self.label_gold_min_tasks}")

    def _check_rates(self) -> None:
        if self.requests_per_second < 0 or self.tokens_per_minute < 0:
            raise ValueError(f"requests_per_second and tokens_per_minute must be >= 0 (0 = no limit), got "
                             f"{self.requests_per_second} and {self.tokens_per_minute}")
        if self.requests_per_second > 0 and self.request_burst < 1:
            raise ValueError(f"request_burst must be >= 1, got {self.request_burst}")
        largest = max(self.limits.max_new_tokens_limit * self.limits.max_n, self.label_max_new_tokens * LABEL_MAX_K)
        if self.tokens_per_minute > 0 and self.token_burst < largest:
            raise ValueError(
                f"token_burst ({self.token_burst}) must hold the largest request: {largest} tokens "
                f"(max_new_tokens_limit x max_n, or label_max_new_tokens x {LABEL_MAX_K}); such a request "
                "could never be admitted")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        """host:port as gRPC wants it (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with `changes` applied (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ServerConfig(**values)


def is_loopback(host: str) -> bool:
    """True when `host` only ever reaches this machine ("localhost", 127.0.0.0/8, ::1).

    A name other than localhost is resolved, and counts as loopback only when every
    address it resolves to is loopback; "" / "0.0.0.0" / "::" (all interfaces) never are.
    """
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::", "*"):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
