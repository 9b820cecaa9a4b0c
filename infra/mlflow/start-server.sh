#!/usr/bin/env bash
# Start the team MLflow tracking server: PostgreSQL as the backend store, S3 as the artifact store.
#
# Artifacts are proxied (--serve-artifacts): clients talk only to this server and never need S3 credentials;
# the server writes to $MLFLOW_ARTIFACTS_DESTINATION with its own (instance profile / IRSA / env) credentials.
#
# Configuration, all from the environment (so that the database password never appears in `ps`):
#   MLFLOW_BACKEND_STORE_URI      required  postgresql://USER:PASSWORD@HOST:5432/DB (driver: psycopg2, i.e.
#                                           postgresql+psycopg2://; +psycopg for psycopg 3 is kept as given)
#   MLFLOW_ARTIFACTS_DESTINATION  required  s3://BUCKET/PREFIX
#   MLFLOW_HOST                   0.0.0.0   interface to bind
#   MLFLOW_PORT                   5000
#   MLFLOW_WORKERS                4         uvicorn worker processes
#   MLFLOW_SERVER_ALLOWED_HOSTS   unset     Host headers to accept besides localhost and private IPs: set it to
#                                           the name clients use (mlflow.example.com, mlflow.mdt.svc.cluster.local:5000)
#   MLFLOW_S3_ENDPOINT_URL        unset     only for S3-compatible stores other than AWS
#   MLFLOW_DB_UPGRADE             0         1: run `mlflow db upgrade` first (after an MLflow version bump;
#                                           back the database up before). A fresh database needs nothing:
#                                           the server creates its tables on first start.
#   MLFLOW_BIN                    mlflow    the mlflow executable
# Extra arguments are passed on to `mlflow server`.
#
# The server replaces this shell (exec) and spawns worker/consumer children: stop it by its process group.
set -euo pipefail

die() { echo "start-server.sh: $*" >&2; exit 2; }

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:5432/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/PREFIX}"
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql+psycopg2://* | postgresql+psycopg://*) ;;
  postgresql://*)
    # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; the image and the test extra ship psycopg2.
    MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${MLFLOW_BACKEND_STORE_URI#postgresql://}"
    echo "start-server.sh: using the psycopg2 driver (postgresql+psycopg2://)" >&2 ;;
  *) die "MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI (the team server keeps its runs in PostgreSQL)" ;;
esac
case "$MLFLOW_ARTIFACTS_DESTINATION" in
  s3://?*) ;;
  *) die "MLFLOW_ARTIFACTS_DESTINATION must be an s3://bucket[/prefix] URI" ;;
esac

MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
export MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export MLFLOW_WORKERS="${MLFLOW_WORKERS:-4}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION  # read by `mlflow server` itself

if [[ "${MLFLOW_DB_UPGRADE:-0}" == 1 ]]; then
  echo "start-server.sh: upgrading the database schema" >&2
  "$MLFLOW_BIN" db upgrade "$MLFLOW_BACKEND_STORE_URI"
fi


echo "start-server.sh: mlflow server on ${MLFLOW_HOST}:${MLFLOW_PORT}, artifacts -> ${MLFLOW_ARTIFACTS_DESTINATION}" >&2
exec "$MLFLOW_BIN" server --serve-artifacts "$@"
