#!/usr/bin/env bash
# The local stack on 127.0.0.1: an S3 endpoint that keeps its data (infra/s3_server.py), the MLflow
# tracking server (artifacts proxied to S3), the Prefect server and the process that serves the
# train-eval deployments (flows/deploy.py). The two servers keep their data in SQLite files, or with
# STACK_DB=postgres in a PostgreSQL server that the stack runs too (Debian's postgresql package).
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
DB="${STACK_DB:-sqlite}"  # where the MLflow and Prefect servers keep their data: sqlite | postgres
case "$DB" in
  sqlite) SERVICES=(s3 mlflow prefect serve) ;;  # start order; stopped in reverse
  postgres) SERVICES=(postgres s3 mlflow prefect serve) ;;
  *) echo "STACK_DB=$DB: expected sqlite (the default) or postgres" >&2; exit 2 ;;
esac
ALL_SERVICES=(postgres s3 mlflow prefect serve)  # what `down` stops, whatever STACK_DB says now

# PostgreSQL (STACK_DB=postgres): one server on 127.0.0.1 with a database for each of MLflow and Prefect,
# owned by one role whose password only reaches the processes that connect (PGPASSWORD, never a command
# line or a URL). Its data lives in $STACK_DIR/postgres; the server runs as an unprivileged user.
PG_PORT="${STACK_POSTGRES_PORT:-5432}"
PG_USER="${STACK_POSTGRES_USER:-stack}"
PG_PASSWORD="${STACK_POSTGRES_PASSWORD:-stack-local-secret}"
PG_OS_USER="${STACK_POSTGRES_OS_USER:-postgres}"  # the server's user when this script runs as root
PG_DATA="$STACK_DIR/postgres"
PG_DATABASES=(mlflow prefect)

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
NO_SECRETS+=(-u PGPASSWORD -u STACK_POSTGRES_PASSWORD)
PG_CREDENTIALS=("PGPASSWORD=$PG_PASSWORD")

client_env() {
  cat <<EOF
export PREFECT_API_URL=$PREFECT_API_URL
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export MLFLOW_S3_ENDPOINT_URL=$MLFLOW_S3_ENDPOINT_URL
EOF
}

# The directory of PostgreSQL's server binaries: $STACK_POSTGRES_BIN, else pg_config's, else the newest
# Debian install (/usr/lib/postgresql/<version>/bin), else wherever `postgres` is on the PATH.
postgres_bin() {
  local dir
  for dir in "${STACK_POSTGRES_BIN:-}" "$(pg_config --bindir 2>/dev/null)" \
             "$(find /usr/lib/postgresql -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)" \
             "$(dirname "$(command -v postgres 2>/dev/null || echo .)")"; do
    [[ -n "$dir" && -x "$dir/postgres" && -x "$dir/initdb" ]] && { echo "$dir"; return 0; }
  done
  return 1
}

# The prefix that runs a command as the PostgreSQL server's user: none (this script's own user), or
# setpriv to $PG_OS_USER when this script runs as root (PostgreSQL refuses to run as root).
AS_PG_USER=()
((EUID == 0)) && AS_PG_USER=(setpriv "--reuid=$PG_OS_USER" "--regid=$PG_OS_USER" --init-groups --)

# The MLflow and Prefect servers' databases: SQLite files in $STACK_DIR, or the stack's PostgreSQL (the
# password reaches them as PGPASSWORD, which libpq and asyncpg read).
if [[ "$DB" == postgres ]]; then
  PG_BIN="$(postgres_bin || true)"
  MLFLOW_STORE="postgresql+psycopg2://$PG_USER@$HOST:$PG_PORT/mlflow"
  PREFECT_DB=("${PG_CREDENTIALS[@]}" "PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://$PG_USER@$HOST:$PG_PORT/prefect")
else
  MLFLOW_STORE="sqlite:///$STACK_DIR/mlflow.db"
  PG_CREDENTIALS=()
  PREFECT_DB=()
fi

# The command that runs a service in the foreground (from the repository), into the array CMD. Only
# the MLflow server (it proxies artifacts to S3) gets the S3 credentials, and the serve process only
# when the dataset itself is on S3 (DIFFUSION_DATA_SOURCE=s3://…: its runs download it). Only the
# MLflow and Prefect servers get the PostgreSQL password.
command_of() {
  local serve_credentials=()
  [[ "${DIFFUSION_DATA_SOURCE:-}" == s3://* ]] && serve_credentials=("${S3_CREDENTIALS[@]}")
  case "$1" in
    postgres) CMD=("${AS_PG_USER[@]}" env "${NO_SECRETS[@]}" "$PG_BIN/postgres" -D "$PG_DATA" -p "$PG_PORT" -c "listen_addresses=$HOST"
                   -c unix_socket_directories=) ;;
    s3) CMD=(env "${NO_SECRETS[@]}" "$PYTHON" infra/s3_server.py --host "$HOST" --port "$S3_PORT"
             --state-dir "$STACK_DIR/s3" --bucket "$BUCKET") ;;
    mlflow) CMD=(env "${NO_SECRETS[@]}" "${S3_CREDENTIALS[@]}" "${PG_CREDENTIALS[@]}" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
                 "$PYTHON" -m mlflow server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "$MLFLOW_STORE"
                 --artifacts-destination "$ARTIFACTS_DESTINATION") ;;
    prefect) CMD=(env "${NO_SECRETS[@]}" "${PREFECT_DB[@]}" "PREFECT_HOME=$STACK_DIR/prefect" "PREFECT_UI_API_URL=$PREFECT_API_URL" "$PYTHON" -m prefect server start
                  --host "$HOST" --port "$PREFECT_PORT") ;;
    serve) CMD=(env "${NO_SECRETS[@]}" "${serve_credentials[@]}"
                "DIFFUSION_RUNS_DIR=${DIFFUSION_RUNS_DIR:-$STACK_DIR/runs}" "DIFFUSION_DATA_DIR=${DIFFUSION_DATA_DIR:-$STACK_DIR/data}" "$PYTHON" -m flows.deploy) ;;
  esac
}

# Exit 0 when the service answers as healthy.
healthy() {
  case "$1" in
    postgres) "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" ;;
    s3) curl -sf -o /dev/null -I "http://$HOST:$S3_PORT/$BUCKET" ;;  # the bucket exists (after the restore)
    mlflow) curl -sf -o /dev/null "http://$HOST:$MLFLOW_PORT/health" ;;
    prefect) curl -sf "http://$HOST:$PREFECT_PORT/api/health" | grep -q true ;;
    serve) curl -sf "http://$HOST:$PREFECT_PORT/api/deployments/name/train-eval/adhoc" | grep -q '"status":"READY"' ;;
  esac
}

pid_file() { echo "$STACK_DIR/pids/$1.pid"; }

# A new PostgreSQL cluster in $PG_DATA (owned by the server's user), its superuser $PG_USER with the
# password, which reaches initdb through a pipe (no file, no command line). Once only.
init_postgres() {
  [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
  mkdir -p "$PG_DATA"
  ((EUID == 0)) && chown "$PG_OS_USER:" "$PG_DATA"
  chmod 700 "$PG_DATA"
  echo "postgres: initdb $PG_DATA (log $STACK_DIR/logs/postgres.log)"
  PGPASSWORD="$PG_PASSWORD" "${AS_PG_USER[@]}" env -u STACK_POSTGRES_PASSWORD sh -c \
    'printf "%s\n" "$PGPASSWORD" | exec "$1/initdb" -D "$2" -U "$3" --pwfile=/dev/stdin --auth=scram-sha-256 -E UTF8 --no-locale' \
    initdb "$PG_BIN" "$PG_DATA" "$PG_USER" >>"$STACK_DIR/logs/postgres.log" 2>&1 \
    || { echo "postgres: initdb failed; last lines of $STACK_DIR/logs/postgres.log:" >&2
         tail -n 30 "$STACK_DIR/logs/postgres.log" >&2; return 1; }
}

# The databases of MLflow and Prefect, created when missing.
create_databases() {
  local name
  for name in "${PG_DATABASES[@]}"; do
    if [[ -z "$(PGPASSWORD="$PG_PASSWORD" "$PG_BIN/psql" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAq \
                -c "SELECT 1 FROM pg_database WHERE datname = '$name'")" ]]; then
      PGPASSWORD="$PG_PASSWORD" "$PG_BIN/createdb" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" "$name"
      echo "postgres: database $name created"
    fi
  done
}

running() {
  local pid
  [[ -f "$(pid_file "$1")" ]] && pid="$(cat "$(pid_file "$1")")" && kill -0 "$pid" 2>/dev/null
}

start() {
  local name="$1" log="$STACK_DIR/logs/$1.log"
  if [[ "$name" == postgres ]]; then init_postgres; fi
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

# What the stack needs besides the project: curl for the health checks, moto for the S3 endpoint; with
# STACK_DB=postgres, PostgreSQL's server, psycopg2, and a STACK_DIR that the server's user can enter.
requirements() {
  command -v curl >/dev/null || { echo "infra/stack.sh needs curl (e.g. apt-get install curl)" >&2; return 1; }
  "$PYTHON" -c "import moto.server" 2>/dev/null \
    || { echo "$PYTHON lacks moto[server]: pip install -e '.[stack]'" >&2; return 1; }
  [[ "$DB" == postgres ]] || return 0
  [[ -n "$PG_BIN" ]] || { echo "STACK_DB=postgres needs PostgreSQL's server binaries (Debian: apt-get install" \
                               "postgresql), or STACK_POSTGRES_BIN naming their folder" >&2; return 1; }
  "$PYTHON" -c "import psycopg2" 2>/dev/null \
    || { echo "$PYTHON lacks psycopg2 (MLflow's PostgreSQL driver): pip install -e '.[stack,postgres]'" >&2; return 1; }
  if ((EUID == 0)); then
    id -u "$PG_OS_USER" >/dev/null 2>&1 && command -v setpriv >/dev/null \
      || { echo "as root, STACK_DB=postgres runs the server as user $PG_OS_USER (STACK_POSTGRES_OS_USER) with" \
                "setpriv: that user or setpriv is missing" >&2; return 1; }
    "${AS_PG_USER[@]}" test -x "$STACK_DIR" \
      || { echo "the PostgreSQL server runs as $PG_OS_USER, who cannot enter STACK_DIR=$STACK_DIR: give its" \
                "folders o+x (chmod) or choose another STACK_DIR" >&2; return 1; }
  fi
}

mkdir -p "$STACK_DIR/pids" "$STACK_DIR/logs"
case "${1:-}" in
  up)
    requirements
    for name in "${SERVICES[@]}"; do
      start "$name"
      if [[ "$name" == postgres ]]; then create_databases; fi
    done
    echo "stack up. Client settings:"; client_env ;;
  down)
    for ((i = ${#ALL_SERVICES[@]} - 1; i >= 0; i--)); do stop "${ALL_SERVICES[i]}"; done ;;
  status) status ;;
  env) client_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
