"""Optuna's own dashboard for a search: the study lives in ``<search folder>/optuna.db``, and
``optuna-dashboard`` (the optional extra ``selftune[dashboard]``) serves it, with each trial's
sampled values, its final objective or PRUNED, and the per-stage objective values (Optuna's
intermediate values) that ASHA stopped trials on."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

STUDY_FILE = "optuna.db"  # what driver.make_searcher writes in the search folder
HOST = "127.0.0.1"  # loopback: the dashboard has no authentication; tunnel (ssh -L) to share it


def study_url(folder: str | Path) -> str:
    """The study's SQLAlchemy URL, absolute so that the command works from any directory."""
    return f"sqlite:///{(Path(folder) / STUDY_FILE).resolve()}"


def dashboard_command(folder: str | Path, *, port: int | None = None) -> str:
    """The shell command that serves the search's study: ``optuna-dashboard sqlite:///<abs>/optuna.db --host 127.0.0.1``."""
    words = ["optuna-dashboard", study_url(folder), "--host", HOST]
    if port is not None:
        words += ["--port", str(port)]
    return shlex.join(words)


def dashboard_line(folder: str | Path) -> str:
    """The line a search ends with; says how to install the dashboard when it is missing."""
    line = f"Optuna's dashboard for this study: {dashboard_command(folder)}"
    if importlib.util.find_spec("optuna_dashboard") is None:
        line += "  (not installed: pip install optuna-dashboard, or the project's [dashboard] extra)"
    return line


__all__ = ["dashboard_command", "dashboard_line", "study_url"]
