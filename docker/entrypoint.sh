#!/usr/bin/env bash
# Container entrypoint: one role per service of docker/compose.yaml.
#
#   entrypoint.sh head   [extra `ray start` args]   Ray head: GCS on :6379, dashboard + Jobs API on :8265
#   entrypoint.sh worker [extra `ray start` args]   Ray worker joining $RAY_HEAD_ADDRESS (ray-head:6379)
#   entrypoint.sh mlflow [extra `mlflow server` args]  MLflow tracking server on :5000, proxied artifacts
#
# Ray roles require token authentication: RAY_AUTH_TOKEN (the same secret on every node and client)
# and RAY_AUTH_MODE=token (set here if unset; any other mode is refused). Inside the container the
# services listen on 0.0.0.0 so that other containers reach them; compose publishes them on the
# host's 127.0.0.1 only. SELFTUNE_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

die() {
    echo "entrypoint.sh: $*" >&2
    exit 2
}

require_ray_token() {
    [ -n "${RAY_AUTH_TOKEN:-}" ] || die "RAY_AUTH_TOKEN is not set: Ray nodes require token authentication (set it in docker/.env; see docker/.env.example)"
    case ${RAY_AUTH_MODE:-token} in
        token) export RAY_AUTH_MODE=token ;;
        *) die "RAY_AUTH_MODE='${RAY_AUTH_MODE}': this image runs Ray with token authentication only (RAY_AUTH_MODE=token)" ;;
    esac
}

role=${1:-}
[ $# -gt 0 ] && shift
case $role in
    head)
        require_ray_token
        command=(ray start --head
            --port="${RAY_GCS_PORT:-6379}"
            --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
            --num-gpus="${RAY_HEAD_NUM_GPUS:-0}"
            --disable-usage-stats --block "$@")
        ;;
    worker)
        require_ray_token
        command=(ray start --address="${RAY_HEAD_ADDRESS:-ray-head:6379}" --disable-usage-stats --block "$@")
        ;;
    mlflow)
        [ -n "${MLFLOW_BACKEND_STORE_URI:-}" ] || die "MLFLOW_BACKEND_STORE_URI is not set (e.g. postgresql+psycopg2://mlflow:PASSWORD@postgres:5432/mlflow)"
        command=(mlflow server
            --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}"
            --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
            --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/mlflow/artifacts}"
            --allowed-hosts "${MLFLOW_SERVER_ALLOWED_HOSTS:-localhost,localhost:5000,127.0.0.1,127.0.0.1:5000}"
            --workers "${MLFLOW_WORKERS:-2}" "$@")
        ;;
    "")
        die "no role given: expected head | worker | mlflow"
        ;;
    *)
        die "unknown role '$role': expected head | worker | mlflow"
        ;;
esac

if [ "${SELFTUNE_DRY_RUN:-0}" = 1 ]; then
    printf '%q' "${command[0]}"; printf ' %q' "${command[@]:1}"; printf '\n'
    exit 0
fi
exec "${command[@]}"
