"""Real tracking servers for integration tests: PostgreSQL from the Debian server binaries, and
``mlflow server`` on top of it, both on 127.0.0.1 and free ports, torn down on exit.

    from servers import start_tracking_server

    with start_tracking_server(tmp_path) as url:        # http://127.0.0.1:PORT
        subprocess.run(["selftune", "run", ..., "--tracking-uri", url])

PostgreSQL refuses to run as root, so when the tests run as root the server runs as an
unprivileged account (``postgres`` if it exists, else ``nobody``) through ``runuser``. Its data
directory and socket live in a fresh folder under the system temp dir (pytest's ``tmp_path`` is
private to root). Tests that need these servers skip only when the PostgreSQL binaries are absent.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server bin folder that has initdb and pg_ctl, or None."""
    candidates = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb"), shutil.which("pg_ctl")
    return Path(found[0]).parent if all(found) else None


def require_postgres() -> Path:
    """The bin folder, or skip the calling test with the reason."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries not installed (looked for {PG_BIN_GLOB}/initdb and pg_ctl on PATH)")
    return bin_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> str | None:
    """The account to run postgres as (None: we are not root, run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL")


def _as_user(user: str | None, command: list[str]) -> list[str]:
    return command if user is None else ["runuser", "-u", user, "--", *command]


@contextlib.contextmanager
def start_postgres(database: str = "mlflow") -> Iterator[str]:
    """Yield ``postgresql+psycopg2://postgres@127.0.0.1:PORT/<database>`` for a throwaway cluster."""
    bin_dir = require_postgres()
    user = _unprivileged_user()
    data_root = Path(tempfile.mkdtemp(prefix="selftune-pg-"))
    data = data_root / "data"
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(data_root, entry.pw_uid, entry.pw_gid)
    port = free_port()
    log = data_root / "postgres.log"
    started = False
    try:
        subprocess.run(
            _as_user(user, [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]),
            check=True, capture_output=True, text=True, timeout=120,
        )
        options = f"-p {port} -k {data_root} -c listen_addresses=127.0.0.1 -c fsync=off"
        result = subprocess.run(
            _as_user(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start"]),
            capture_output=True, text=True, timeout=90,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}\n{_tail(log)}")
        started = True
        subprocess.run(
            [str(bin_dir / "createdb") if (bin_dir / "createdb").exists() else "createdb",
             "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
            check=True, capture_output=True, text=True, timeout=60,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            stopped = subprocess.run(
                _as_user(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"]),
                capture_output=True, text=True, timeout=60,
            )
            if stopped.returncode != 0:
                _kill_postmaster(data)
        shutil.rmtree(data_root, ignore_errors=True)


def _kill_postmaster(data: Path) -> None:
    """Last resort when pg_ctl cannot stop the server: SIGKILL the postmaster this test started."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_for_health(url: str, process: subprocess.Popen | None = None, timeout: float = 90.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{_tail(log) if log else ''}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout:.0f} s:\n{_tail(log) if log else ''}")


@contextlib.contextmanager
def start_mlflow_server(backend_store_uri: str, artifacts: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts; yields (url, process)."""
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # MLflow 3's job executor (GenAI scorers) starts ~8 extra processes: 2 vs 10 processes here, and
    # start-up measured 20 s instead of 52 s on a loaded 2-core machine. Tracking does not use it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(log, "wb") as log_file:
        # Own session: the server forks uvicorn workers; tear down the whole group we started.
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=artifacts.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, log=log)
        yield url, process
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@contextlib.contextmanager
def start_tracking_server(tmp_path: Path, backend: str = "postgres") -> Iterator[str]:
    """An MLflow tracking server for one test: PostgreSQL backend (``backend="postgres"``) or a
    SQLite file (``backend="sqlite"``), artifacts proxied into ``tmp_path/artifacts``. Yields its
    ``http://127.0.0.1:PORT`` URL; the server log is ``tmp_path/mlflow-server.log``."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "mlflow-server.log"
    with contextlib.ExitStack() as stack:
        if backend == "postgres":
            store = stack.enter_context(start_postgres())
        elif backend == "sqlite":
            store = f"sqlite:///{tmp_path / 'mlflow-server.db'}"
        else:
            raise ValueError(f"backend {backend!r}: expected 'postgres' or 'sqlite'")
        url, _ = stack.enter_context(start_mlflow_server(store, tmp_path / "artifacts", log))
        yield url


def run_selftune(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m selftune ARGS`` in a subprocess, one thread per op (a 2-core machine), no inherited tracking URI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "selftune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class TcpProxy:
    """A loopback TCP forwarder to ``target_port``: ``close()`` makes the server behind it
    unreachable at once (connection refused, open connections reset) while the real server stays up
    for other tests. ``url`` is ``http://127.0.0.1:PORT`` of the proxy."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                continue
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


# --- headless Chromium for tests of web UIs (the MLflow UI, Optuna's dashboard) -------------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The machine's network is closed: without these Chromium stalls on background connections.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def require_browser() -> None:
    """Skip the calling test when Chromium, chromedriver or selenium is missing."""
    pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            pytest.skip(f"{binary} missing: apt-get install -y chromium chromium-driver")


@contextlib.contextmanager
def headless_chromium(width: int = 1700, height: int = 900):
    """A selenium driver for a headless Chromium with a throwaway profile; quit on exit."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = Path(tempfile.mkdtemp(prefix="selftune-chromium-"))
    for flag in [*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
