"""Shared fixtures: every test gets its own synthetic-data cache, MLflow store and Ray token home,
so tests never touch the user's ~/.cache, ~/.ray or ./mlflow.db."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, session_home, tmp_path_factory):
    # One synthetic cache for the whole session: generating it once is the point of a cache.
    monkeypatch.setenv("SELFTUNE_CACHE", str(session_home / "cache"))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(session_home / "ray_auth_token"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def quickstart_overrides(epochs: int = 2, steps: int = 10) -> list[str]:
    """The quickstart pipeline shrunk to seconds: same stages, fewer steps."""
    sets = ["stages.pseudo_label.threshold=0.5"]  # a barely trained model is rarely 90 % sure
    for stage in ("supervised", "self_train"):
        sets += [f"stages.{stage}.epochs={epochs}", f"stages.{stage}.steps_per_epoch={steps}"]
    return [arg for item in sets for arg in ("--set", item)]
