"""`import selftune.cli` (what `selftune --help` and every bad-input error pay) leaves Ray, Tune,
Optuna and MLflow to the commands that use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import REPO

DEFERRED = ["ray", "ray.train", "ray.tune", "optuna", "mlflow", "sqlalchemy", "alembic"]


def test_importing_the_cli_defers_ray_optuna_and_mlflow():
    code = f"import json, sys, selftune.cli; print(json.dumps([m for m in {DEFERRED!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
