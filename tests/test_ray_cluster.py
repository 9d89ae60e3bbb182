"""The local Ray instance selftune starts is reachable from this machine only: every listening
socket of its processes is on loopback, no metrics exporter is on, the auth token is 0600, and its
session files are under the folder selftune passes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from selftune.engine.cluster import session_root

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

_SESSION = textwrap.dedent("""
    import json, os, sys, time
    from selftune.engine.cluster import ensure_ray
    import ray, psutil  # psutil: the copy Ray ships (ray/thirdparty_files), importable once ray is

    ensure_ray(temp_dir=sys.argv[1])
    ray.get(ray.remote(lambda: os.getpid()).remote())
    time.sleep(3)  # the monitor's and the dashboard head's metrics servers come up after init
    listeners = []
    for process in psutil.Process().children(recursive=True):
        try:
            name = process.name()
            sockets = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        listeners += [[name, s.laddr.ip, s.laddr.port] for s in sockets if s.status == psutil.CONN_LISTEN]
    session = ray._private.worker._global_node.get_session_dir_path()
    print(json.dumps({"listeners": listeners, "session": session}))
""")


def _short_folder() -> Path:
    """A folder whose path leaves room for Ray's socket paths (pytest's tmp_path is too long)."""
    return Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))


def test_a_local_instance_listens_on_loopback_only():
    run_folder = _short_folder() / "run"
    try:
        result = subprocess.run([sys.executable, "-c", _SESSION, str(run_folder)], capture_output=True, text=True,
                                timeout=180, env={**os.environ, "RAY_ADDRESS": ""})
    finally:
        shutil.rmtree(run_folder.parent, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    listeners = report["listeners"]
    assert any(name == "gcs_server" for name, _, _ in listeners) and len(listeners) >= 5, listeners
    exposed = [item for item in listeners if item[1] not in LOOPBACK]
    assert exposed == []  # before: gcs, raylet, workers on *, the agent's metrics on 0.0.0.0
    assert Path(report["session"]).is_relative_to(run_folder / "ray")  # not /tmp/ray
    token = Path(os.environ["HOME"]) / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_session_files_stay_in_the_folder_unless_its_path_is_too_long_for_sockets(tmp_path):
    assert session_root(None) is None  # Ray's default
    short = _short_folder()
    try:
        assert session_root(short) == str(short.resolve() / "ray")
    finally:
        shutil.rmtree(short)
    deep = tmp_path / ("x" * 60) / "search"
    root = Path(session_root(deep))
    assert root.parent == Path(tempfile.gettempdir()) / f"selftune-{os.getuid()}"
    assert len(str(root)) + len("/session_2026-12-01_21-32-11_979345_4194304/sockets/plasma_store") <= 107
    assert stat.S_IMODE(root.parent.stat().st_mode) == 0o700
    assert session_root(deep) == str(root)  # the same folder each time for the same run
    root.rmdir()
