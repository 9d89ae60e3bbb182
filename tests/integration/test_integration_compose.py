"""The cluster definition, tested without a Docker engine: docker/compose.yaml parsed and checked
against what the code and the image expect, the Dockerfile's base tag and COPY sources, and the
image's own scripts (docker/entrypoint.sh, docker/install.sh) run here in dry-run mode, plus the
install's real ``check`` step against this venv."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
INSTALL = DOCKER / "install.sh"
RAY_NODES = ("ray-head", "ray-worker")
IMAGE_SERVICES = ("ray-head", "ray-worker", "mlflow")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of every short-syntax port mapping."""
    result = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) == 3, f"port {entry!r} does not name a host IP: it would listen on every interface"
        result.append((parts[0], int(parts[1]), int(parts[2].split("/")[0])))
    return result


def named_mounts(service: dict) -> dict[str, str]:
    """{volume name: container path} of the service's named-volume mounts."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        if not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


def dry_run(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_"))}
    return subprocess.run(["bash", str(script), *args], env={**clean, "SELFTUNE_DRY_RUN": "1", **(env or {})},
                          capture_output=True, text=True, timeout=60)


def resolve(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} interpolation, for the tests' values."""
    def substitute(match: re.Match) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if name in variables:
            return variables[name]
        if operator == ":-":
            return rest
        raise KeyError(f"{name} is required: {rest}")
    return re.sub(r"\$\{(\w+)(?:(:[?-])([^}]*))?\}", substitute, value)


# -- compose.yaml ------------------------------------------------------------------------------

def test_services_and_image_built_from_the_dockerfile(compose, dockerfile):
    services = compose["services"]
    assert set(services) >= {"ray-head", "ray-worker", "mlflow", "postgres"}
    base = dict(dockerfile)["FROM"]
    for name in IMAGE_SERVICES:
        service = services[name]
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == REPO
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        # The image tag names the base it is built on (ray version, python, CUDA).
        assert service["image"].split(":")[1] == base.split(":")[1], (service["image"], base)
    assert len({services[name]["image"] for name in IMAGE_SERVICES}) == 1
    assert {services[name]["command"][0] for name in IMAGE_SERVICES} == {"head", "worker", "mlflow"}
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/var/lib/postgresql/data" in named_mounts(services["postgres"]).values()


def test_published_ports_bind_loopback_only(compose):
    ports = {name: published(service) for name, service in compose["services"].items()}
    for name, mappings in ports.items():
        for host_ip, _, _ in mappings:
            assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip}, not loopback"
    assert ("127.0.0.1", 8265, 8265) in ports["ray-head"]  # dashboard + Jobs API
    assert ("127.0.0.1", 5000, 5000) in ports["mlflow"]    # MLflow UI + API
    assert ports["ray-worker"] == [] and ports["postgres"] == []  # reached inside the compose network only


def test_ray_nodes_share_the_storage_volume_at_the_same_path(compose):
    head, worker = (named_mounts(compose["services"][name]) for name in RAY_NODES)
    shared = {volume: path for volume, path in head.items() if worker.get(volume) == path}
    assert shared, f"no volume mounted at the same path on head {head} and worker {worker}"
    for volume in shared:
        assert volume in compose["volumes"]
    for name in RAY_NODES:
        environment = env_of(compose["services"][name])
        for variable in ("SELFTUNE_STORAGE", "SELFTUNE_CACHE"):
            assert any(environment[variable].startswith(path + "/") for path in shared.values()), \
                f"{name}: {variable}={environment[variable]} is not on a volume shared by all Ray nodes"


def test_ray_nodes_environment_tracking_and_token_auth(compose):
    mlflow_port = published(compose["services"]["mlflow"])[0][2]
    environments = [env_of(compose["services"][name]) for name in RAY_NODES]
    for environment in environments:
        assert environment["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
        assert environment["RAY_AUTH_MODE"] == "token"
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN(:\?[^}]+)?\}", environment["RAY_AUTH_TOKEN"]), \
            "the token must come from docker/.env, never be written in compose.yaml"
        assert environment["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"
        assert int(environment["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60  # a stopped search job has time to save its state
    shared_keys = ("MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "SELFTUNE_STORAGE")
    assert [{key: env[key] for key in shared_keys} for env in environments].count(
        {key: environments[0][key] for key in shared_keys}) == len(environments), "head and workers disagree"
    head_port = re.search(r"--port=(\d+)", dry_run(ENTRYPOINT, "head", env={"RAY_AUTH_TOKEN": "t"}).stdout).group(1)
    assert env_of(compose["services"]["ray-worker"])["RAY_HEAD_ADDRESS"] == f"ray-head:{head_port}"


def test_worker_reserves_nvidia_gpus(compose):
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)


def test_mlflow_accepts_service_names_and_stores_artifacts_on_a_volume(compose):
    service = compose["services"]["mlflow"]
    environment = env_of(service)
    allowed = set(environment["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","))
    port = published(service)[0][2]
    assert {"mlflow", f"mlflow:{port}", "localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}"} <= allowed
    # Ray nodes call the server by the host in their tracking URI: it must be allowed, port included.
    tracking_host = env_of(compose["services"]["ray-head"])["MLFLOW_TRACKING_URI"].split("//")[1]
    assert tracking_host in allowed
    assert environment["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in environment["MLFLOW_BACKEND_STORE_URI"]
    assert "postgres" in service["depends_on"]
    artifacts = environment["MLFLOW_ARTIFACTS_DESTINATION"]
    assert any(artifacts == path or artifacts.startswith(path + "/") for path in named_mounts(service).values())


def test_env_example_defines_every_variable_and_no_secret(compose):
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert used <= set(example), f"compose uses {used - set(example)} that .env.example does not define"
    for key, value in example.items():
        assert value.startswith("replace-"), f".env.example {key} looks like a real value: {value!r}"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    # With the example's values every ${...} resolves (no variable left for compose to complain about).
    resolve(COMPOSE.read_text(), example)


# -- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_base_is_a_pinned_cuda_ray_image(dockerfile):
    base = dict(dockerfile)["FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-cu\d{3}", base)
    assert match, f"FROM {base}: pin an explicit rayproject/ray:<version>-py3XX-cuXXX tag (not -gpu or latest)"
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert match.group(1) == pinned, f"image Ray {match.group(1)} != pyproject's ray=={pinned}"


def test_dockerfile_copies_existing_paths_and_installs_at_build_time(dockerfile):
    copies = [arguments for instruction, arguments in dockerfile if instruction == "COPY"]
    assert copies
    for arguments in copies:
        sources = [part for part in shlex.split(arguments) if not part.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repository (build context)"
    runs = " ".join(arguments for instruction, arguments in dockerfile if instruction == "RUN")
    assert "docker/install.sh" in runs
    environment = " ".join(arguments for instruction, arguments in dockerfile if instruction == "ENV")
    assert "RAY_ENABLE_UV_RUN_RUNTIME_ENV=0" in environment
    assert "RAY_AUTH_TOKEN" not in environment, "the token must not be baked into the image"
    entrypoint = yaml.safe_load(dict(dockerfile)["ENTRYPOINT"])[0]
    assert entrypoint.endswith("docker/entrypoint.sh") and os.access(ENTRYPOINT, os.X_OK)
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {"**/.venv", "mlflow.db", ".git"} <= set(ignored)


# -- the image's scripts -------------------------------------------------------------------------

@pytest.mark.parametrize("script", [ENTRYPOINT, INSTALL])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_entrypoint_head_and_worker_commands(compose):
    token = {"RAY_AUTH_TOKEN": "test-token"}
    head = dry_run(ENTRYPOINT, *compose["services"]["ray-head"]["command"], env=token)
    assert head.returncode == 0, head.stderr
    argv = shlex.split(head.stdout)
    assert argv[:3] == ["ray", "start", "--head"]
    assert "--block" in argv and "--dashboard-host=0.0.0.0" in argv and "--disable-usage-stats" in argv
    dashboard_port = published(compose["services"]["ray-head"])[0][2]
    assert f"--dashboard-port={dashboard_port}" in argv

    worker = dry_run(ENTRYPOINT, *compose["services"]["ray-worker"]["command"], "--num-gpus=1", env=token)
    assert worker.returncode == 0, worker.stderr
    argv = shlex.split(worker.stdout)
    assert argv[:2] == ["ray", "start"] and "--head" not in argv
    assert "--address=ray-head:6379" in argv and "--block" in argv and argv[-1] == "--num-gpus=1"


def test_entrypoint_mlflow_command(compose):
    service = compose["services"]["mlflow"]
    environment = {key: resolve(value, {"POSTGRES_PASSWORD": "pw"}) for key, value in env_of(service).items()}
    result = dry_run(ENTRYPOINT, *service["command"], env=environment)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:2] == ["mlflow", "server"]
    option = dict(zip(argv[2::2], argv[3::2]))
    assert option["--port"] == str(published(service)[0][2]) and option["--host"] == "0.0.0.0"
    assert option["--backend-store-uri"] == "postgresql+psycopg2://mlflow:pw@postgres:5432/mlflow"
    assert option["--artifacts-destination"] == environment["MLFLOW_ARTIFACTS_DESTINATION"]
    assert option["--allowed-hosts"] == environment["MLFLOW_SERVER_ALLOWED_HOSTS"]


@pytest.mark.parametrize("args, env, message", [
    (["head"], {}, "RAY_AUTH_TOKEN is not set"),
    (["worker"], {}, "RAY_AUTH_TOKEN is not set"),
    (["head"], {"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}, "token authentication only"),
    (["mlflow"], {}, "MLFLOW_BACKEND_STORE_URI is not set"),
    (["bogus"], {"RAY_AUTH_TOKEN": "t"}, "unknown role 'bogus'"),
    ([], {}, "no role given"),
])
def test_entrypoint_refuses_bad_setups(args, env, message):
    result = dry_run(ENTRYPOINT, *args, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


def test_install_script_installs_cuda_torch_then_selftune_with_postgres_driver():
    result = dry_run(INSTALL, "/src", env={"SELFTUNE_INSTALL_STEPS": "install", "PYTHON": "python"})
    # Dry run still refuses a folder that is not the project.
    assert result.returncode == 2 and "no pyproject.toml" in result.stderr
    result = dry_run(INSTALL, str(REPO), env={"SELFTUNE_INSTALL_STEPS": "install", "PYTHON": "python"})
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    readme_torch = re.search(r"pip install (torch==[\d.]+)", (REPO / "README.md").read_text()).group(1)
    assert commands[0] == ["python", "-m", "pip", "install", "--no-cache-dir", readme_torch]
    assert "--index-url" not in commands[0] and "+cpu" not in " ".join(commands[0])  # the default index: CUDA wheels
    assert commands[1][:5] == ["python", "-m", "pip", "install", "--no-cache-dir"]
    assert str(REPO) in commands[1] and any(arg.startswith("psycopg2-binary") for arg in commands[1])
    assert dry_run(INSTALL, env={"SELFTUNE_INSTALL_STEPS": "nonsense"}).returncode == 2


def test_install_check_passes_in_this_environment():
    """The image build's last step, for real: everything jobs import is installed (no runtime pip)."""
    result = subprocess.run(["bash", str(INSTALL)], env={**os.environ, "SELFTUNE_INSTALL_STEPS": "check",
                            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "install.sh check: ok" in result.stdout
