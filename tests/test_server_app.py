"""The assembled server: open mode, TLS, health while loading, reflection, metrics,
graceful SIGTERM, and the command-line tools (`rlhf keys`, `rlhf query`, admin CLIs)."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import admin_cli, query_cli
from clients.client import RlhfClient
from common.paths import REPO_ROOT
from common.store import Store
from server import keys_cli
from server.app import SERVICES, OpenModeError, build_server
from server.config import ServerConfig, is_loopback
from server.engines.hf import HFEngine
from server_harness import ServerThread, completions_in_store, create_key, greedy_reference, server_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------- open mode


def test_open_mode_refuses_a_non_loopback_bind(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def bind(config: ServerConfig) -> None:
        with Store(config.store_path) as store:
            running = await build_server(config, HFEngine(tiny_model_dir, 0), store)
            await running.server.stop(0)

    keyless = server_config(tmp_path, tiny_model_dir, host="0.0.0.0")
    with pytest.raises(OpenModeError, match="holds no API keys"):
        asyncio.run(bind(keyless))
    create_key(keyless.store_path, "admin", "operator")
    asyncio.run(bind(keyless))  # with a key, any address may be bound


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                                ("", False), ("10.1.2.3", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_mode_serves_loopback_callers_by_their_user_id(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = server_config(tmp_path, tiny_model_dir)
    with ServerThread(config) as server:
        with RlhfClient(server.target, user_id="alice") as alice, RlhfClient(server.target) as anonymous:
            named = alice.generate("hi", max_new_tokens=2)
            unnamed = anonymous.generate("hi", max_new_tokens=2)
            assert alice.get_stats().prompts == 2  # every role, Admin included
        users = {r["prompt_id"]: r["user_id"] for r in completions_in_store(
            config.store_path, [named.prompt_id, unnamed.prompt_id])}
        assert users == {named.prompt_id: "alice", unnamed.prompt_id: "anonymous"}
        # The first key ends open mode, without a restart.
        key, _ = create_key(config.store_path, "user", "bob")
        with RlhfClient(server.target, user_id="alice") as alice, pytest.raises(grpc.RpcError) as caught:
            alice.generate("hi", max_new_tokens=2)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with RlhfClient(server.target, key) as bob:
            assert bob.generate("hi", max_new_tokens=2).completions[0].completion_tokens == 2


# ---------------------------------------------------------------- TLS


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 signed by its own key: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_round_trip(tmp_path: Path, tiny_model_dir: Path) -> None:
    cert, key_file = self_signed_certificate(tmp_path)
    config = server_config(tmp_path, tiny_model_dir, tls_cert=cert, tls_key=key_file)
    key, _ = create_key(config.store_path, "user", "tls-user")
    with ServerThread(config) as server:
        with RlhfClient(server.target, key, root_cert=cert) as client:
            streamed = "".join(e.text_delta for e in client.generate_stream("hi", temperature=0, max_new_tokens=6))
            assert client.generate("hi", temperature=0, max_new_tokens=6).completions[0].text == streamed
        with RlhfClient(server.target, key) as plaintext, pytest.raises(grpc.RpcError) as caught:
            plaintext.generate("hi", max_new_tokens=2, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- health, reflection, metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unloaded(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[ServerThread, str]]:
    """A server whose engine has not loaded yet, with metrics on; and an admin key."""
    config = server_config(tmp_path, tiny_model_dir, metrics_port=_free_port())
    key, _ = create_key(config.store_path, "admin", "operator")
    with ServerThread(config, load_engine=False) as server:
        yield server, key


def test_health_is_not_serving_while_the_engine_loads(unloaded: tuple[ServerThread, str]) -> None:
    server, key = unloaded
    with RlhfClient(server.target, key) as client:
        assert client.health_status("rlhf.v1.Inference") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            client.generate("hi", max_new_tokens=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in caught.value.details()
        server.load()
        assert [client.health_status(s) for s in ("", "rlhf.v1.Inference", "rlhf.v1.Admin")] == [SERVING] * 3
        assert client.generate("hi", max_new_tokens=2).completions[0].completion_tokens == 2
        assert [client.health_status(service.name) for service in SERVICES] == [SERVING] * len(SERVICES)


def test_reflection_lists_every_service(unloaded: tuple[ServerThread, str]) -> None:
    server, _ = unloaded
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in response.list_services_response.service}
    assert names == {s.name for s in SERVICES} | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert {"rlhf.v1.Inference", "rlhf.v1.Admin", "rlhf.v1.Feedback"} <= names


def test_metrics_on_their_own_port(unloaded: tuple[ServerThread, str]) -> None:
    server, key = unloaded
    server.load()
    with RlhfClient(server.target, key) as client:
        client.generate("hi", max_new_tokens=3, n=2)
        list(client.generate_stream("hi", max_new_tokens=3))
        with pytest.raises(grpc.RpcError):
            client.generate("", max_new_tokens=3)
    port = server.config.metrics_port
    expected = ['rlhf_grpc_requests_total{code="OK",method="rlhf.v1.Inference/Generate"} 1.0',
                'rlhf_grpc_requests_total{code="OK",method="rlhf.v1.Inference/GenerateStream"} 1.0',
                'rlhf_grpc_requests_total{code="INVALID_ARGUMENT",method="rlhf.v1.Inference/Generate"} 1.0',
                "rlhf_generated_tokens_total 9.0", "rlhf_time_to_first_token_seconds_count 2.0",
                "rlhf_inflight_generations 0.0", "rlhf_serving_policy_version 0.0"]
    # context.abort sends the status before the interceptor's bookkeeping runs, so the client
    # can see INVALID_ARGUMENT a moment before the counter moves: scrape until it settles.
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if all(line in text for line in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for line in expected:
        assert line in text, line
    for name in ["rlhf_grpc_request_seconds_bucket", "rlhf_generation_tokens_per_second_bucket",
                 "rlhf_swap_stall_seconds_bucket", "rlhf_policy_swaps"]:
        assert name in text, name


def test_metrics_bind_loopback_and_speak_https_when_tls_is_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    cert, key_file = self_signed_certificate(tmp_path)
    config = server_config(tmp_path, tiny_model_dir, tls_cert=cert, tls_key=key_file, metrics_port=_free_port())
    create_key(config.store_path, "admin", "operator")
    with ServerThread(config, load_engine=False) as server:
        assert server.running.deps.metrics._http.server_address[0] == "127.0.0.1"  # type: ignore[union-attr]
        url = f"127.0.0.1:{config.metrics_port}/metrics"
        trusted = ssl.create_default_context(cafile=str(cert))
        text = urllib.request.urlopen(f"https://{url}", context=trusted, timeout=10).read().decode()
        assert "rlhf_serving_policy_version" in text
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP gets no metrics
            urllib.request.urlopen(f"http://{url}", timeout=10)


# ---------------------------------------------------------------- rlhf serve and SIGTERM


def _read_lines(stream, lines: list[str], seen: threading.Event) -> None:  # noqa: ANN001
    for line in stream:
        lines.append(line)
        if "listening on" in line:
            seen.set()


def test_sigterm_drains_in_flight_requests(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`rlhf serve` in a process of its own: SIGTERM lets a running stream finish, then exits 0."""
    reference = greedy_reference(tiny_model_dir, ["Tell me a story."], 24)["Tell me a story."]
    args = [sys.executable, "-m", "common.cli", "serve", "--port", "0", "--engine", "hf",
            "--store-path", str(tmp_path / "store.sqlite"), "--checkpoints-root", str(tmp_path / "checkpoints"),
            "--base-model-dir", str(tiny_model_dir), "--base-model-name", "tiny-llama", "--grace-seconds", "60"]
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    listening = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines, listening), daemon=True)
    reader.start()
    try:
        assert listening.wait(300), "".join(lines)
        target = next(line for line in lines if "listening on" in line).split("listening on ")[1].split()[0]
        with RlhfClient(target, user_id="drained") as client:
            channel_ready = grpc.channel_ready_future(client.channel)
            channel_ready.result(timeout=60)
            _wait_for_serving(client)
            stream = client.generate_stream("Tell me a story.", temperature=0, max_new_tokens=24)
            events = [next(stream)]
            process.send_signal(signal.SIGTERM)
            events += list(stream)  # the in-flight stream is drained, not cut
        assert events[-1].HasField("completion") and events[-1].completion.text == reference
        assert process.wait(120) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = "".join(lines)
    assert "SIGTERM received" in log and "stopped" in log


def _wait_for_serving(client: RlhfClient) -> None:
    """Poll the health service until the policy serves (the engine loads after the bind)."""
    import time

    for _ in range(1200):
        if client.health_status("rlhf.v1.Inference", timeout=10) == SERVING:
            return
        time.sleep(0.1)
    raise AssertionError("the server never reported SERVING")


# ---------------------------------------------------------------- command-line tools


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store.sqlite")
    assert keys_cli.main(["--store", store, "create", "--role", "labeler", "--user", "lab", "--group", "g1"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("rlhf_")
    assert keys_cli.main(["--store", store, "list"]) == 0
    listing = capsys.readouterr().out
    assert "lab" in listing and "labeler" in listing and "g1" in listing and key not in listing
    key_id = listing.splitlines()[1].split()[0]
    assert keys_cli.main(["--store", store, "revoke", key_id]) == 0
    assert keys_cli.main(["--store", store, "revoke", key_id]) == 1  # already revoked
    capsys.readouterr()
    assert keys_cli.main(["--store", store, "list", "--active"]) == 0
    assert "lab" not in capsys.readouterr().out


def test_query_and_admin_clis(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = server_config(tmp_path, tiny_model_dir)
    key, _ = create_key(config.store_path, "admin", "operator")
    reference = greedy_reference(tiny_model_dir, ["The quick brown fox"], 8)["The quick brown fox"]
    with ServerThread(config) as server:
        flags = ["--target", server.target, "--key", key]
        assert query_cli.main(["The quick brown fox", "--temperature", "0", "--max-new-tokens", "8", *flags]) == 0
        out, err = capsys.readouterr()
        assert out == reference + "\n" and "policy v0" in err
        assert query_cli.main(["Hello there", "--n", "2", "--seed", "1", "--max-new-tokens", "4", *flags]) == 0
        assert "--- sample 1 ---" in capsys.readouterr().out
        assert admin_cli.policies_main(flags) == 0
        assert "serving" in capsys.readouterr().out
        assert admin_cli.cycle_main(["now", *flags]) == 0
        assert "cycle 1 queued" in capsys.readouterr().out
        assert admin_cli.cycles_main(flags) == 0
        assert "queued" in capsys.readouterr().out
        assert admin_cli.policies_main(["swap", "7", *flags]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        assert query_cli.main(["hi", "--target", server.target, "--key", "rlhf_wrong"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
