# shellcheck shell=bash
# Shared helpers for vidpulse scripts (scripts/stack, scripts/test, scripts/demo, scripts/bench).
#
# Usage (from a script in scripts/):
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Sourcing this file defines functions and default variables and puts cargo's bin dir
# (${CARGO_HOME:-~/.cargo}/bin) on PATH if missing; it changes no shell options and exports
# nothing new (call `vp_env` to export the connection variables for the local stack).

if [[ -n "${_VP_LIB_SOURCED:-}" ]]; then
    return 0
fi
_VP_LIB_SOURCED=1

# ---------------------------------------------------------------------------------------------
# Repository root and well-known paths
# ---------------------------------------------------------------------------------------------

# Repo root: the parent of the directory holding this file (works without git, e.g. a tarball).
VP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
# State of the local stack (data, config, logs, pid files); VIDPULSE_STACK_DIR moves it, e.g. to
# run a second, isolated stack on other ports.
VP_STACK_DIR="${VIDPULSE_STACK_DIR:-$VP_ROOT/.stack}"
[[ "$VP_STACK_DIR" == /* ]] || VP_STACK_DIR="$PWD/$VP_STACK_DIR"
VP_CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

# Ports of the local stack (overridable through the environment).
VIDPULSE_KAFKA_PORT="${VIDPULSE_KAFKA_PORT:-9092}"
VIDPULSE_REDIS_PORT="${VIDPULSE_REDIS_PORT:-6379}"
VIDPULSE_CLICKHOUSE_HTTP_PORT="${VIDPULSE_CLICKHOUSE_HTTP_PORT:-8123}"
VIDPULSE_CLICKHOUSE_TCP_PORT="${VIDPULSE_CLICKHOUSE_TCP_PORT:-9000}"

# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

# Prefix for log lines; scripts may override it before logging (e.g. VP_LOG_PREFIX=test).
VP_LOG_PREFIX="${VP_LOG_PREFIX:-stack}"

vp_log()  { printf '%s: %s\n' "$VP_LOG_PREFIX" "$*" >&2; }
vp_warn() { printf '%s: warning: %s\n' "$VP_LOG_PREFIX" "$*" >&2; }
vp_die()  { printf '%s: error: %s\n' "$VP_LOG_PREFIX" "$*" >&2; exit 1; }

# Print the last N (default 30) lines of a file, indented, to stderr.
vp_tail_log() {
    local file="$1" n="${2:-30}"
    if [[ -s "$file" ]]; then
        printf '%s: --- last %s lines of %s ---\n' "$VP_LOG_PREFIX" "$n" "$file" >&2
        tail -n "$n" "$file" | sed 's/^/    /' >&2
        printf '%s: ---\n' "$VP_LOG_PREFIX" >&2
    else
        printf '%s: (log %s is empty or missing)\n' "$VP_LOG_PREFIX" "$file" >&2
    fi
}

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

# Put cargo's bin dir on PATH for this process if it exists and is not there yet.
vp_add_cargo_path() {
    case ":$PATH:" in
        *":$VP_CARGO_BIN:"*) ;;
        *) [[ -d "$VP_CARGO_BIN" ]] && PATH="$VP_CARGO_BIN:$PATH" ;;
    esac
    return 0
}

has_cmd() { command -v "$1" >/dev/null 2>&1; }

# need_cmd CMD [HINT]: die unless CMD is on PATH.
need_cmd() {
    has_cmd "$1" || vp_die "required command '$1' not found${2:+ ($2)}"
}

# Run a command as root: directly when root, else through sudo.
vp_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif has_cmd sudo; then
        sudo -n "$@" || sudo "$@"
    else
        vp_die "need root (or sudo) to run: $*"
    fi
}

# vp_build_deps: Debian packages the Rust build needs besides gcc/make:
# OpenSSL headers and pkg-config for librdkafka's TLS/SCRAM support, and the
# openssl CLI (the TLS test makes its certificates with it). Idempotent.
vp_build_deps() {
    local pkgs=() p
    for p in libssl-dev pkg-config openssl; do
        dpkg -s "$p" >/dev/null 2>&1 || pkgs+=("$p")
    done
    vp_apt_install "${pkgs[@]}"
}

# vp_apt_install PKG...: install Debian packages non-interactively (one apt-get update first).
# Daemons are not auto-started by the packages (a temporary policy-rc.d forbids it), so that
# the system services do not grab the ports the local stack uses.
vp_apt_install() {
    (($# > 0)) || return 0
    need_cmd apt-get "this script installs packages with apt-get (Debian/Ubuntu)"
    vp_log "installing Debian packages: $*"
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
        if vp_as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"; then
            made_policy=1
        fi
    fi
    local rc=0
    if [[ -z "${_VP_APT_UPDATED:-}" ]]; then
        vp_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || rc=$?
        _VP_APT_UPDATED=1
    fi
    if ((rc == 0)); then
        vp_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "$@" >&2 || rc=$?
    fi
    if ((made_policy)); then
        vp_as_root rm -f "$policy" || true
    fi
    ((rc == 0)) || vp_die "apt-get install failed (exit $rc): $*"
}

# ---------------------------------------------------------------------------------------------
# Ports and waiting
# ---------------------------------------------------------------------------------------------

# vp_port_open PORT [HOST]: true if a TCP connect to HOST:PORT (default 127.0.0.1) succeeds.
# Uses bash's /dev/tcp, so it needs no extra package.
vp_port_open() {
    local port="$1" host="${2:-127.0.0.1}"
    if has_cmd timeout; then
        timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null
    else
        bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null
    fi
}

# vp_wait_for SECONDS CMD...: run CMD every 0.25 s until it succeeds; false on timeout.
vp_wait_for() {
    local timeout="$1"
    shift
    local deadline=$((SECONDS + timeout))
    while :; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        ((SECONDS < deadline)) || return 1
        sleep 0.25
    done
}

# vp_wait_port PORT [SECONDS=60] [HOST]: wait until the port accepts TCP connections.
vp_wait_port() { vp_wait_for "${2:-60}" vp_port_open "$1" "${3:-127.0.0.1}"; }

# vp_wait_port_closed PORT [SECONDS=30] [HOST]: wait until nothing accepts on the port.
vp_wait_port_closed() {
    local port="$1"
    local host="${3:-127.0.0.1}"
    vp_wait_for "${2:-30}" _vp_port_closed "$port" "$host"
}
_vp_port_closed() { ! vp_port_open "$1" "$2"; }

# vp_redis_ping [PORT] [HOST]: true if Redis answers PING with PONG.
vp_redis_ping() {
    local port="${1:-$VIDPULSE_REDIS_PORT}" host="${2:-127.0.0.1}"
    if has_cmd redis-cli; then
        # timeout: redis-cli waits forever on a listener that never replies.
        [[ "$(timeout 3 redis-cli -h "$host" -p "$port" ping 2>/dev/null)" == PONG ]]
    else
        # Fallback without redis-cli: speak RESP inline over /dev/tcp.
        timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
            printf "PING\r\n" >&3; IFS= read -r -t 2 line <&3; [[ "$line" == "+PONG"* ]]' \
            "$host" "$port" 2>/dev/null
    fi
}

# True when VIDPULSE_REDIS_CLUSTER says the binaries talk to a Redis Cluster.
vp_redis_is_cluster() {
    case "${VIDPULSE_REDIS_CLUSTER:-}" in
        1 | true | TRUE | True | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

# vp_redis_scan PATTERN: the keys matching PATTERN in the Redis of $VIDPULSE_REDIS_URL; on a Redis
# Cluster (VIDPULSE_REDIS_CLUSTER) those of every master, asked through the URL's first seed (SCAN
# on one node would see only that node's slots).
vp_redis_scan() {
    local pattern="$1" url="${VIDPULSE_REDIS_URL%%,*}"
    if ! vp_redis_is_cluster; then
        redis-cli -u "$url" --scan --pattern "$pattern"
        return
    fi
    local scheme="${url%%://*}" rest="${url#*://}" auth="" addr
    [[ "$rest" == *@* ]] && auth="${rest%@*}@"
    redis-cli -u "$url" cluster nodes |
        awk '$3 ~ /master/ && $3 !~ /fail/ && NF > 8 { split($2, a, "@"); print a[1] }' |
        while read -r addr; do
            redis-cli -u "$scheme://$auth$addr" --scan --pattern "$pattern"
        done
}

# vp_redis_unlink KEY: UNLINK on the server, or on the master of KEY's slot (-c follows MOVED).
vp_redis_unlink() {
    local url="${VIDPULSE_REDIS_URL%%,*}"
    if vp_redis_is_cluster; then
        redis-cli -c -u "$url" unlink "$1"
    else
        redis-cli -u "$url" unlink "$1"
    fi
}

# vp_clickhouse_ping [HTTP_PORT] [HOST]: true if ClickHouse answers SELECT 1 over HTTP.
vp_clickhouse_ping() {
    local port="${1:-$VIDPULSE_CLICKHOUSE_HTTP_PORT}" host="${2:-127.0.0.1}"
    [[ "$(curl -sS -m 3 "http://$host:$port/" --data-binary 'SELECT 1' 2>/dev/null)" == 1 ]]
}

# vp_clickhouse_drop_prefix PREFIX: drops the ClickHouse tables and views (database vidpulse)
# of a topic prefix (a benchmark's run).
vp_clickhouse_drop_prefix() {
    local stem="${1//[^A-Za-z0-9_]/_}" ch="http://127.0.0.1:${VIDPULSE_CLICKHOUSE_HTTP_PORT:-8123}/"
    curl -sf "$ch" --data-binary "SELECT name FROM system.tables WHERE database = 'vidpulse' AND startsWith(name, '$stem')" \
        | while read -r t; do curl -sf "$ch" --data-binary "DROP TABLE IF EXISTS vidpulse.\`$t\`" >/dev/null; done
}

# vp_prom_sum PORT NAME [LABEL-PATTERN]: the sum of a metric's samples on a stage's admin port
# (/metrics); empty when it does not answer within 2 s.
vp_prom_sum() {
    curl -sf --max-time 2 "http://127.0.0.1:$1/metrics" | grep "^$2" | grep -- "${3:-}" \
        | awk '{s+=$2} END {printf "%d", s}'
}

# vp_kafka_ping [PORT] [HOST]: true if the Kafka port accepts TCP connections.
vp_kafka_ping() { vp_port_open "${1:-$VIDPULSE_KAFKA_PORT}" "${2:-127.0.0.1}"; }

# ---------------------------------------------------------------------------------------------
# Environment for the pipeline, tests, demo and benchmarks
# ---------------------------------------------------------------------------------------------

# Export the connection settings of the local stack, keeping any value already set.
vp_env() {
    export VIDPULSE_KAFKA_BROKERS="${VIDPULSE_KAFKA_BROKERS:-127.0.0.1:$VIDPULSE_KAFKA_PORT}"
    export VIDPULSE_REDIS_URL="${VIDPULSE_REDIS_URL:-redis://127.0.0.1:$VIDPULSE_REDIS_PORT}"
    export VIDPULSE_CLICKHOUSE_URL="${VIDPULSE_CLICKHOUSE_URL:-http://127.0.0.1:$VIDPULSE_CLICKHOUSE_HTTP_PORT}"
}

vp_add_cargo_path
