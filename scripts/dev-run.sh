#!/usr/bin/env bash
# `make run`: start memcached and redis-server on loopback (daemonised, pidfiles in .run/),
# then memshadow in the foreground in front of them. The servers stop when memshadow does.
# Extra arguments are passed to memshadow. The config is your own file, memshadow.yaml here
# (MEMSHADOW_CONFIG=PATH for another), written by `memshadow --init-config` on the first run
# and never overwritten; the shipped defaults stay in the package.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/.run
PY=$ROOT/.venv/bin/python
mkdir -p "$RUN"

# 0 if nothing listens on 127.0.0.1:$1 (we can bind it ourselves).
port_is_free() {
    "$PY" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

free_port() {
    "$PY" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pick_port() {
    if port_is_free "$1"; then echo "$1"; else free_port; fi
}

wait_for_port() {
    local name=$1 port=$2
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "error: $name did not start listening on 127.0.0.1:$port" >&2
    return 1
}

stop_pidfile() {
    local pidfile=$RUN/$1.pid
    if [ -f "$pidfile" ]; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    fi
}

MEMSHADOW_PID=""
cleanup() {
    if [ -n "$MEMSHADOW_PID" ] && kill -0 "$MEMSHADOW_PID" 2>/dev/null; then
        kill -TERM "$MEMSHADOW_PID" 2>/dev/null || true
        wait "$MEMSHADOW_PID" 2>/dev/null || true
    fi
    stop_pidfile memcached
    stop_pidfile redis
}
trap cleanup EXIT

# Servers left behind by a run that was killed hard.
stop_pidfile memcached
stop_pidfile redis

MEMCACHED_PORT=$(pick_port 11211)
REDIS_PORT=$(pick_port 6379)

# memcached refuses to run as root unless told which user to be; it writes its pidfile after
# switching, so stay the user that owns .run/.
memcached_user=()
if [ "$(id -u)" -eq 0 ]; then
    memcached_user=(-u root)
fi
memcached -d -P "$RUN/memcached.pid" -l 127.0.0.1 -p "$MEMCACHED_PORT" -U 0 "${memcached_user[@]}"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$RUN/redis.pid" --logfile "$RUN/redis.log" --dir "$RUN" \
    --save "" --appendonly no
wait_for_port memcached "$MEMCACHED_PORT"
wait_for_port redis-server "$REDIS_PORT"
echo "memcached on 127.0.0.1:$MEMCACHED_PORT, redis-server on 127.0.0.1:$REDIS_PORT" \
    "(pidfiles and redis.log in .run/); Ctrl-C stops all three" >&2

# memshadow runs as a child we wait for, so that a SIGTERM to this script can be passed on.
# Ctrl-C reaches memshadow directly from the terminal; this script just keeps waiting.
CONFIG=${MEMSHADOW_CONFIG:-memshadow.yaml}
if [ ! -e "$CONFIG" ]; then
    "$ROOT/.venv/bin/memshadow" --init-config "$CONFIG" >&2
fi
"$ROOT/.venv/bin/memshadow" --config "$CONFIG" \
    --memcached "127.0.0.1:$MEMCACHED_PORT" --redis "redis://127.0.0.1:$REDIS_PORT/0" "$@" &
MEMSHADOW_PID=$!
trap 'kill -TERM "$MEMSHADOW_PID" 2>/dev/null || true' TERM
trap ':' INT
status=0
while :; do
    if wait "$MEMSHADOW_PID"; then status=0; else status=$?; fi
    kill -0 "$MEMSHADOW_PID" 2>/dev/null || break  # still alive: wait was cut short by a signal
done
exit "$status"
