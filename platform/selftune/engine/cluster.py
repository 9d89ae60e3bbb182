"""The Ray instance selftune runs on: the cluster of a Ray job (``RAY_ADDRESS``), or a private local
instance that this process starts and owns.

A local instance is for this machine only, so it is started to be reachable from this machine only:
every Ray server (GCS, raylet, workers, agents, the monitor's and dashboard head's metrics) listens
on 127.0.0.1, the agent's Prometheus exporter is off, and the auth token Ray writes is 0600.

What was measured with Ray 2.60 (``tests/test_ray_cluster.py`` checks the listeners):
- ``_node_ip_address="127.0.0.1"`` alone does not help: ``ray.init`` turns a loopback address into
  the machine's external one unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false (its macOS and
  Windows default). Ray 2.60 binds its servers to the node IP, so with that constant false and the
  node IP 127.0.0.1 everything is on loopback. There is no public option for it.
- Without ``enable_metrics_collection=False`` the dashboard agent serves Prometheus metrics on
  0.0.0.0. The monitor (44217) and the dashboard head (44227) start a metrics server whenever
  ``prometheus_client`` is importable, with no switch; they follow the node IP (loopback here).
- SIGKILL of the driver: GCS and raylet end with it; the dashboard agent and runtime-env agent
  notice the raylet's death within a second and exit on their own 60-90 s later. Nothing in a
  SIGKILLed driver can run, so that delay is Ray's; ``ray.shutdown`` at a normal exit is Ray's own
  ``atexit`` hook.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Set in the processes of a local instance that selftune started (Ray's workers inherit the
# environment of the process that starts the instance): what runs there may skip cluster machinery.
LOCAL_INSTANCE_ENV = "SELFTUNE_LOCAL_RAY"
_SOCKET_PATH_MAX = 107  # sun_path on Linux, less the terminating NUL
# What Ray appends to its temp dir for its longest socket path (a session name with a 7-digit pid).
_SESSION_SOCKET_TAIL = len("/session_2026-12-01_21-32-11_979345_4194304/sockets/plasma_store")
_log = logging.getLogger(__name__)


def ensure_ray(*, worker_output: bool = True, temp_dir: str | Path | None = None) -> None:
    """Join the cluster this process belongs to (``RAY_ADDRESS``, e.g. inside a Ray job), or start a
    local one sized to this machine, on loopback only. ``worker_output=False`` keeps workers'
    prints (Ray Train's per-report lines) off this terminal: a search prints its own progress.
    ``temp_dir``: a folder selftune owns (a run's or search's) to keep the local instance's session
    files in, instead of ``/tmp/ray``."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": "WARNING", "log_to_driver": worker_output}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
        return
    _keep_local_instance_on_loopback()
    os.environ[LOCAL_INSTANCE_ENV] = "1"
    # address="local": always a private instance, never a `ray start` cluster that happens to run
    # on this machine (set RAY_ADDRESS=auto to use that one).
    ray.init(address="local", include_dashboard=False, configure_logging=True, _node_ip_address=LOOPBACK,
             _temp_dir=session_root(temp_dir), _system_config={"enable_metrics_collection": False}, **quiet)
    _make_private(_auth_token_path())


def on_local_instance() -> bool:
    """Whether this process runs on (or started) a private local instance of selftune's."""
    return os.environ.get(LOCAL_INSTANCE_ENV) == "1"


def _keep_local_instance_on_loopback() -> None:
    # Ray reads this constant when it resolves the node IP (services.get_node_ip_address); true
    # turns 127.0.0.1 into the external address. Only this process's local instance is affected.
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def session_root(temp_dir: str | Path | None) -> str | None:
    """``<temp_dir>/ray``, or a short folder under ``/tmp/selftune-<uid>/`` when that path would make
    Ray's unix sockets longer than the 107 bytes Linux allows; ``None``: Ray's default."""
    if temp_dir is None:
        return None
    wanted = Path(temp_dir).expanduser().resolve() / "ray"
    if len(os.fsencode(wanted)) + _SESSION_SOCKET_TAIL <= _SOCKET_PATH_MAX:
        wanted.mkdir(parents=True, exist_ok=True)
        return str(wanted)
    short = _private_dir(Path(tempfile.gettempdir()) / f"selftune-{os.getuid()}")
    root = short / hashlib.sha256(os.fsencode(wanted)).hexdigest()[:12]
    root.mkdir(mode=0o700, exist_ok=True)
    _log.info("Ray session files of %s go to %s (the folder's path is too long for unix sockets)", wanted, root)
    return str(root)


def _private_dir(path: Path) -> Path:
    """A 0700 folder of this user (refused if someone else owns it: /tmp is shared)."""
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(f"{path} is not a folder owned by this user; remove it or set TMPDIR")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def _auth_token_path() -> Path:
    # Where Ray 2.60 writes the token it generates (authentication_token_setup._get_default_token_path).
    return Path.home() / ".ray" / "auth_token"


def _make_private(token: Path) -> None:
    """Ray writes the token with the umask's mode (0644 here): anyone on the machine could read the
    secret that lets them run code on the cluster. Only its owner needs to read it."""
    if token.is_file() and stat.S_IMODE(token.stat().st_mode) & 0o077:
        token.chmod(0o600)
