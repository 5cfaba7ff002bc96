#!/usr/bin/env bash
# Local services for `guardian serve` and its integration tests, on 127.0.0.1:
#   - a Kafka-protocol broker on port 9092: Nisshi (Apache-Kafka compatible, written in Rust),
#     pinned and built once per machine into GUARDIAN_HOME/tools (about 18 min on 2 cores);
#   - Redis on port 6379: the one already listening, or Debian's redis-server (installed if
#     missing).
#
# usage: ops/services.sh up|down|status|topics
#   up      start what is not running, wait until it answers, create the default topics
#   down    stop what this script started (a Redis it did not start is left alone)
#   status  say what is listening; exit 1 if something is missing
#   topics  create the default topics (idempotent)
#
# Environment: GUARDIAN_HOME (default ~/.cache/guardian), GUARDIAN_KAFKA_PORT (9092),
# GUARDIAN_REDIS_PORT (6379), GUARDIAN_PARTITIONS (partitions per topic, default 4).
set -euo pipefail

NISSHI_VERSION=0.7.0-pre.2
HOME_DIR=${GUARDIAN_HOME:-$HOME/.cache/guardian}
KAFKA_PORT=${GUARDIAN_KAFKA_PORT:-9092}
REDIS_PORT=${GUARDIAN_REDIS_PORT:-6379}
PARTITIONS=${GUARDIAN_PARTITIONS:-4}
TOOLS=$HOME_DIR/tools/nisshi-$NISSHI_VERSION
NISSHI=$TOOLS/bin/nisshi
STATE=$HOME_DIR/services
TOPICS=(guardian.queries guardian.verdicts guardian.audit guardian.dlq)

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

# True when something accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2 i
  for i in $(seq 1 100); do
    listening "$port" && return 0
    sleep 0.1
  done
  die "$what did not start listening on 127.0.0.1:$port within 10 s (log: $STATE/$what.log)"
}

build_broker() {
  [ -x "$NISSHI" ] && return 0
  command -v cargo >/dev/null || die "cargo is required to build the broker (https://rustup.rs)"
  log "building the Nisshi $NISSHI_VERSION broker into $TOOLS (once per machine, ~18 min on 2 cores)"
  mkdir -p "$TOOLS"
  # libsql: sqlite:// storage; dynostore: memory:// storage. The default build keeps nothing.
  cargo install nisshi --version "$NISSHI_VERSION" --locked --no-default-features \
    --features libsql,dynostore --root "$TOOLS" >&2 \
    || die "building the broker failed; see cargo's output above"
}

start_broker() {
  if listening "$KAFKA_PORT"; then
    log "broker: something already listens on 127.0.0.1:$KAFKA_PORT; using it"
    return 0
  fi
  build_broker
  # The broker reads a .env from its working directory: give it an empty one of its own.
  mkdir -p "$STATE/nisshi"
  (
    cd "$STATE/nisshi"
    nohup "$NISSHI" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine memory://guardian/ >"$STATE/nisshi.log" 2>&1 &
    echo $! >"$STATE/nisshi.pid"
  )
  wait_port "$KAFKA_PORT" nisshi
  log "broker: Nisshi $NISSHI_VERSION on 127.0.0.1:$KAFKA_PORT (pid $(cat "$STATE/nisshi.pid"))"
}

start_redis() {
  if listening "$REDIS_PORT"; then
    log "redis: already listening on 127.0.0.1:$REDIS_PORT; using it"
    return 0
  fi
  if ! command -v redis-server >/dev/null; then
    log "redis: installing Debian's redis-server"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q redis-server >&2 \
      || die "could not install redis-server; install it, or point --redis-url at a running Redis"
  fi
  mkdir -p "$STATE"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
    --appendonly no --dir "$STATE" --pidfile "$STATE/redis.pid" \
    --logfile "$STATE/redis.log" >&2
  wait_port "$REDIS_PORT" redis
  log "redis: started on 127.0.0.1:$REDIS_PORT"
}

create_topics() {
  [ -x "$NISSHI" ] || die "the broker tool is not built yet: run 'ops/services.sh up'"
  local t
  for t in "${TOPICS[@]}"; do
    # An existing topic is not an error: `up` is idempotent.
    if out=$("$NISSHI" topic create "$t" --partitions "$PARTITIONS" \
      --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>&1); then
      log "topic $t: created with $PARTITIONS partitions"
    elif grep -qi 'exist' <<<"$out"; then
      log "topic $t: exists"
    else
      printf '%s\n' "$out" >&2
      die "could not create topic $t"
    fi
  done
}

stop_pidfile() {
  local file=$1 what=$2 pid i
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "$what: stopped (pid $pid)"
  fi
  rm -f "$file"
}

status() {
  local ok=0
  if listening "$KAFKA_PORT"; then log "broker: up on 127.0.0.1:$KAFKA_PORT"; else log "broker: down"; ok=1; fi
  if listening "$REDIS_PORT"; then log "redis: up on 127.0.0.1:$REDIS_PORT"; else log "redis: down"; ok=1; fi
  return $ok
}

case "${1:-}" in
  up) start_redis; start_broker; create_topics ;;
  down) stop_pidfile "$STATE/nisshi.pid" broker; stop_pidfile "$STATE/redis.pid" redis ;;
  status) status ;;
  topics) create_topics ;;
  build) build_broker ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
