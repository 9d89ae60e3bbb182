"""Shared fixtures: every test gets its own synthetic-data cache, MLflow store, Ray token home and
stage store, so tests never touch the user's ~/.cache, ~/.ray, ./mlflow.db or runs/stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True, scope="module")
def module_stage_store(tmp_path_factory):
    """A stage store per module, for module-scoped fixtures (set up before any test's own): the
    runs of one module's fixture share it, and no module reuses another's stages."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SELFTUNE_STAGE_STORE", str(tmp_path_factory.mktemp("stages")))
        yield


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, session_home, tmp_path_factory, module_stage_store):
    # Each test's runs compute their stages (a test that wants reuse runs twice within itself).
    monkeypatch.setenv("SELFTUNE_STAGE_STORE", str(tmp_path_factory.mktemp("stages")))
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

