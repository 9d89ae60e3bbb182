"""Shared fixtures: every test gets its own synthetic-data cache, MLflow store and Ray token home,
so tests never touch the user's ~/.cache, ~/.ray or ./mlflow.db."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, session_home, tmp_path_factory):
    # One synthetic cache for the whole session: generating it once is the point of a cache.
    monkeypatch.setenv("SELFTUNE_CACHE", str(session_home / "cache"))
    monkeypatch.setenv("HOME", str(session_home))  # Ray writes its auth token to ~/.ray
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """A 60 + 16 image synthetic dataset in the folder format: end-to-end runs label 36-48 images
    and evaluate 16 instead of ~1000 and 200, which keeps the slow tests minutes shorter."""
    from selftune.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("small-synthetic"), num_train=60, num_val=16)

