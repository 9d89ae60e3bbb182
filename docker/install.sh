#!/usr/bin/env bash
# Build-time install of selftune and everything its Ray jobs need, so that a running cluster never
# pip-installs (cluster nodes may have no registry access). The Dockerfile RUNs this script; the
# integration tests run it too (dry run for the install, a real `check` against their own venv).
#
#   docker/install.sh [SOURCE_DIR]          install, then check (what the image build does)
#   SELFTUNE_INSTALL_STEPS=check docker/install.sh
#                                           only verify that the current Python has it all
#   SELFTUNE_DRY_RUN=1 docker/install.sh    print the commands instead of running them
#
# Environment: PYTHON (default: python3, else python), SELFTUNE_TORCH (default torch==2.13.0: from
# the default index this is the CUDA build on Linux x86_64, which is what a GPU image needs; CPU-only
# machines pin the CPU wheel instead, see the README).
set -euo pipefail

source_dir=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
python=${PYTHON:-$(command -v python3 || command -v python)}
torch_spec=${SELFTUNE_TORCH:-torch==2.13.0}
steps=${SELFTUNE_INSTALL_STEPS:-install check}

run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [ "${SELFTUNE_DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

for step in $steps; do
    case $step in
        install)
            [ -f "$source_dir/pyproject.toml" ] || { echo "install.sh: no pyproject.toml in $source_dir" >&2; exit 2; }
            # torch first, pinned: an unpinned torch resolved by pip could pick another CUDA build.
            run "$python" -m pip install --no-cache-dir "$torch_spec"
            # selftune with its pinned ray/mlflow/optuna, and MLflow's PostgreSQL driver.
            run "$python" -m pip install --no-cache-dir "$source_dir" "psycopg2-binary>=2.9"
            ;;
        check)
            # Everything a head, worker, MLflow server or job imports or runs, without network.
            run "$python" -c 'import importlib, sys
for name in ("selftune", "selftune.cli", "selftune.stages", "torch", "ray", "ray.train.torch", "ray.tune", "ray.dashboard", "ray.job_submission", "optuna", "mlflow", "mlflow.server", "psycopg2", "sqlalchemy", "albumentations", "yaml"):
    importlib.import_module(name)
import selftune, torch, ray, mlflow
print("install.sh check: ok", "selftune", selftune.__version__, "torch", torch.__version__, "ray", ray.__version__, "mlflow", mlflow.__version__)'
            run "$python" -m selftune --help
            ;;
        *)
            echo "install.sh: unknown step '$step' (expected: install, check)" >&2
            exit 2
            ;;
    esac
done
