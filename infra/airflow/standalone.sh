#!/usr/bin/env bash
# Airflow 3 standalone (api-server, scheduler, dag-processor, triggerer; LocalExecutor,
# SQLite) on Greetflow's DAGs. Development only: see docs/airflow.md.
#
#   infra/airflow/standalone.sh            # UI and REST API on http://127.0.0.1:8080
#   AIRFLOW_PORT=8090 infra/airflow/standalone.sh
#
# Log in as `admin`; the password is generated on first start and kept in
# $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated. Stop with Ctrl-C (or
# SIGTERM to this script): every process Airflow started is stopped.
#
# Every variable below can be set by the caller; the defaults use the repository's
# .venv, keep Airflow's state in .greetflow/airflow and point the DAGs at the same
# local stack and database as `greetflow dev up` and `greetflow worker ...`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/airflow" ]; then
  echo "error: $VENV/bin/airflow not found: run 'make install' (installs the airflow extra)" >&2
  exit 1
fi
# standalone starts its components as `airflow <command>`, found on PATH.
export PATH="$VENV/bin:$PATH"

PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$REPO/.greetflow/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$REPO/dags}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="${AIRFLOW__API__BASE_URL:-http://127.0.0.1:$PORT}"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$PORT/execution/}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
# New campaign DAGs start paused: unpause them in the UI or with the REST API.
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-True}"
# A handful of task slots is plenty on a laptop (the default, 32, forks 32 idle workers).
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
# Pick up new brief files within 30 s (Airflow's default is 5 min).
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}"

# Greetflow: the same data dir (SQLite database, render scratch) as the CLI run from the
# repository root; every other GREETFLOW_ variable passes through unchanged.
export GREETFLOW_DATA_DIR="${GREETFLOW_DATA_DIR:-$REPO/.greetflow}"

mkdir -p "$AIRFLOW_HOME"
cd "$REPO"
echo "Airflow home: $AIRFLOW_HOME   DAGs: $AIRFLOW__CORE__DAGS_FOLDER   UI/API: http://127.0.0.1:$PORT"

# Standalone runs as a job (process group) of its own, and stopping this script stops
# that whole group: on Ctrl-C, standalone stops its components, but the LocalExecutor's
# worker processes ignore SIGINT and SIGTERM and would otherwise outlive it as orphans.
# (Job control also keeps SIGINT un-ignored in the job, so standalone can shut down.)
set -m
airflow standalone &
pid=$!
stopped=0
stop() {
  [ "$stopped" = 1 ] && return
  stopped=1
  trap - INT TERM
  kill -INT "$pid" 2>/dev/null || true       # standalone's own clean shutdown
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -TERM -- "-$pid" 2>/dev/null || true  # what is left of its process group
  sleep 2
  kill -KILL -- "-$pid" 2>/dev/null || true
}
trap stop INT TERM
status=0
wait "$pid" || status=$?
stop
exit "$status"
