#!/usr/bin/env bash
# The local stack on 127.0.0.1: an S3 endpoint that keeps its data (infra/s3_server.py), the MLflow
# tracking server (SQLite, artifacts proxied to S3), the Prefect server (SQLite) and the process that
# serves the train-eval deployments (flows/deploy.py).
#
#   infra/stack.sh up        start what is not running, wait until each is healthy
#   infra/stack.sh down      stop everything (process groups: TERM, then KILL after a grace period)
#   infra/stack.sh status    running/healthy per service; exit 1 if any is not
#   infra/stack.sh env       the variables a client shell needs: eval "$(infra/stack.sh env)"
#
# Settings come from the environment, else from $STACK_ENV_FILE (default: .env in the repository),
# else the defaults below. State (databases, S3 objects, pid files, logs, runs) lives in $STACK_DIR.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_FILE="${STACK_ENV_FILE:-$REPO/.env}"
if [[ -f "$ENV_FILE" ]]; then
  # shellcheck disable=SC1090
  set -a; . "$ENV_FILE"; set +a
fi
cd "$REPO"  # relative paths in the settings are relative to the repository

HOST=127.0.0.1
STACK_DIR="$(mkdir -p "${STACK_DIR:-$REPO/infra/.state}" && cd "${STACK_DIR:-$REPO/infra/.state}" && pwd)"
S3_PORT="${STACK_S3_PORT:-9000}"
MLFLOW_PORT="${STACK_MLFLOW_PORT:-5000}"
PREFECT_PORT="${STACK_PREFECT_PORT:-4200}"
BUCKET="${DIFFUSION_S3_BUCKET:-diffusion}"
ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-s3://$BUCKET/mlflow}"
TIMEOUT="${STACK_TIMEOUT:-180}"
PYTHON="${PYTHON:-python3}"  # the environment with the project installed (pip install -e .)
SERVICES=(s3 mlflow prefect serve)  # start order; stopped in reverse

# The S3 credentials go only to the processes that use them (see command_of); every service starts
# without them, whatever this shell or the settings file exported.
AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-stack-local}"
AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-stack-local-secret}"
NO_SECRETS=(-u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN)
S3_CREDENTIALS=("AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY")
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export MLFLOW_S3_ENDPOINT_URL="http://$HOST:$S3_PORT"
export MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT"
export PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true

client_env() {
  cat <<EOF
export PREFECT_API_URL=$PREFECT_API_URL
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export MLFLOW_S3_ENDPOINT_URL=$MLFLOW_S3_ENDPOINT_URL
EOF
}

# The command that runs a service in the foreground (from the repository), into the array CMD. Only
# the MLflow server (it proxies artifacts to S3) gets the S3 credentials, and the serve process only
# when the dataset itself is on S3 (DIFFUSION_DATA_SOURCE=s3://…: its runs download it).
command_of() {
  local serve_credentials=()
  [[ "${DIFFUSION_DATA_SOURCE:-}" == s3://* ]] && serve_credentials=("${S3_CREDENTIALS[@]}")
  case "$1" in
    s3) CMD=(env "${NO_SECRETS[@]}" "$PYTHON" infra/s3_server.py --host "$HOST" --port "$S3_PORT"
             --state-dir "$STACK_DIR/s3" --bucket "$BUCKET") ;;
    mlflow) CMD=(env "${NO_SECRETS[@]}" "${S3_CREDENTIALS[@]}" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
                 "$PYTHON" -m mlflow server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "sqlite:///$STACK_DIR/mlflow.db"
                 --artifacts-destination "$ARTIFACTS_DESTINATION") ;;
    prefect) CMD=(env "${NO_SECRETS[@]}" "PREFECT_HOME=$STACK_DIR/prefect" "$PYTHON" -m prefect server start
                  --host "$HOST" --port "$PREFECT_PORT") ;;
    serve) CMD=(env "${NO_SECRETS[@]}" "${serve_credentials[@]}"
                "DIFFUSION_RUNS_DIR=${DIFFUSION_RUNS_DIR:-$STACK_DIR/runs}" "DIFFUSION_DATA_DIR=${DIFFUSION_DATA_DIR:-$STACK_DIR/data}" "$PYTHON" -m flows.deploy) ;;
  esac
}

# Exit 0 when the service answers as healthy.
healthy() {
  case "$1" in
    s3) curl -sf -o /dev/null -I "http://$HOST:$S3_PORT/$BUCKET" ;;  # the bucket exists (after the restore)
    mlflow) curl -sf -o /dev/null "http://$HOST:$MLFLOW_PORT/health" ;;
    prefect) curl -sf "http://$HOST:$PREFECT_PORT/api/health" | grep -q true ;;
    serve) curl -sf "http://$HOST:$PREFECT_PORT/api/deployments/name/train-eval/adhoc" | grep -q '"status":"READY"' ;;
  esac
}

pid_file() { echo "$STACK_DIR/pids/$1.pid"; }

running() {
  local pid
  [[ -f "$(pid_file "$1")" ]] && pid="$(cat "$(pid_file "$1")")" && kill -0 "$pid" 2>/dev/null
}

start() {
  local name="$1" log="$STACK_DIR/logs/$1.log"
  if running "$name"; then
    echo "$name: already running (pid $(cat "$(pid_file "$name")"))"
  else
    command_of "$name"
    # setsid: the service leads its own process group, so `down` can stop it with all its children.
    (exec setsid "${CMD[@]}" >>"$log" 2>&1 </dev/null) &
    echo $! >"$(pid_file "$name")"
    echo "$name: started (pid $!, log $log)"
  fi
  local waited=0
  until healthy "$name"; do
    if ! running "$name"; then
      echo "$name: exited during start; last lines of $log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    if ((waited >= TIMEOUT)); then
      echo "$name: not healthy after ${TIMEOUT}s; last lines of $log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "$name: healthy"
}

stop() {
  local name="$1" pid
  if ! running "$name"; then
    rm -f "$(pid_file "$name")"
    return 0
  fi
  pid="$(cat "$(pid_file "$name")")"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 "${STACK_STOP_GRACE:-20}"); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$(pid_file "$name")"
  echo "$name: stopped"
}

status() {
  local name ok=0
  for name in "${SERVICES[@]}"; do
    if running "$name" && healthy "$name"; then
      echo "$name: healthy (pid $(cat "$(pid_file "$name")"))"
    elif running "$name"; then
      echo "$name: running but not healthy (pid $(cat "$(pid_file "$name")"))"; ok=1
    else
      echo "$name: stopped"; ok=1
    fi
  done
  return $ok
}

# What the stack needs besides the project: curl for the health checks, moto for the S3 endpoint.
requirements() {
  command -v curl >/dev/null || { echo "infra/stack.sh needs curl (e.g. apt-get install curl)" >&2; return 1; }
  "$PYTHON" -c "import moto.server" 2>/dev/null \
    || { echo "$PYTHON lacks moto[server]: pip install -e '.[stack]'" >&2; return 1; }
}

mkdir -p "$STACK_DIR/pids" "$STACK_DIR/logs"
case "${1:-}" in
  up)
    requirements
    for name in "${SERVICES[@]}"; do start "$name"; done
    echo "stack up. Client settings:"; client_env ;;
  down)
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop "${SERVICES[i]}"; done ;;
  status) status ;;
  env) client_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
