# shellcheck shell=bash
# scripts/bench dims: the T+1 profile loader (`vidpulse dims load`) on 1 M
# viewer rows next to redis-benchmark on the same Redis, same run. Sourced by
# scripts/bench (which provides BIN, WORK, COUNT, pids, vp_* helpers).
#
#   BENCH_DIMS_ROWS=1000000 scripts/bench dims
#
# Figures printed:
#   - the loader, first load (new keys) and a daily reload (existing keys),
#     rows/s: each row is a version-checked write of 4 fields (province,
#     grade, region, gender; 3 of them versioned per field) in a Lua script;
#   - redis-benchmark -t hset -P 64: one field into one hash per command
#     (the reference the issue names);
#   - redis-benchmark hset of the same 4-field rows into new keys, -P 64,
#     without any version check: the ceiling for these rows;
#   - redis-server's own CPU seconds (INFO cpu) per million rows for each: on
#     two cores the client and the server share the machine, and the server's
#     CPU is the figure that says what the version checks cost.
# Every key the benchmark writes is deleted at the end.
bench_main() {
    local rows="${BENCH_DIMS_ROWS:-1000000}"
    local port="${VIDPULSE_REDIS_PORT:-6379}"
    local prefix
    prefix="bench$(date +%s).dims."
    need_cmd redis-benchmark "apt-get install redis-tools"
    need_cmd jq
    local file="$WORK/viewers-$rows.csv"
    if [[ ! -s "$file" ]]; then
        vp_log "generating $rows viewer rows in $file"
        awk -v n="$rows" 'BEGIN {
            split("浙江 江苏 上海 北京 广东 四川", prov, " ")
            print "user_id,province,grade,region,gender"
            for (i = 0; i < n; i++)
                printf "%d,%s,%d,%d,%s\n", 2000 + i, prov[i % 6 + 1], 1 + i % 5, 1000 + i % 300, (i % 2 ? "m" : "f")
        }' >"$file"
    fi
    # Values expanded now: the trap runs after this function's locals are gone.
    # shellcheck disable=SC2064
    trap "_dims_cleanup_keys '$port' '$prefix'; cleanup" EXIT

    vp_log "loader: $rows rows, first load (new keys)"
    local first reload c0 c1 c2 c3 c4
    c0="$(_dims_server_cpu "$port")"
    first="$("$BIN/vidpulse" dims load --kind viewer --file "$file" --key-prefix "${prefix}viewer:" --json)"
    c1="$(_dims_server_cpu "$port")"
    vp_log "loader: $rows rows, daily reload (same keys, newer as-of)"
    reload="$("$BIN/vidpulse" dims load --kind viewer --file "$file" --key-prefix "${prefix}viewer:" --json)"
    c2="$(_dims_server_cpu "$port")"
    for s in "$first" "$reload"; do
        [[ "$(jq '.loaded' <<<"$s")" == "$rows" ]] || vp_die "loader did not load every row: $s"
    done

    vp_log "redis-benchmark -t hset -n $rows -P 64"
    local hset same
    hset="$(redis-benchmark -p "$port" -t hset -n "$rows" -P 64 -q 2>/dev/null | tr '\r' '\n' |
        grep -Eo '[0-9.]+ requests per second' | tail -n1 | cut -d' ' -f1)"
    redis-cli -p "$port" unlink myhash >/dev/null
    vp_log "redis-benchmark hset of the same 4-field rows into new keys, -P 64"
    c3="$(_dims_server_cpu "$port")"
    same="$(redis-benchmark -p "$port" -n "$rows" -r 1000000000 -P 64 -q \
        hset "${prefix}plain:__rand_int__" province 浙江 grade 3 region 1122 gender f 2>/dev/null |
        tr '\r' '\n' | grep -Eo '[0-9.]+ requests per second' | tail -n1 | cut -d' ' -f1)"
    c4="$(_dims_server_cpu "$port")"

    local l1 l2
    l1="$(jq '.rows / .seconds' <<<"$first")"
    l2="$(jq '.rows / .seconds' <<<"$reload")"
    _dims_cleanup_keys "$port" "$prefix"
    awk -v l1="$l1" -v l2="$l2" -v h="$hset" -v s="$same" -v n="$rows" \
        -v f="$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}')" \
        -v r="$(awk -v a="$c1" -v b="$c2" 'BEGIN {print b - a}')" \
        -v b="$(awk -v a="$c3" -v b="$c4" 'BEGIN {print b - a}')" 'BEGIN {
        printf "dims load, first load:   %d rows = %8.0f rows/s\n", n, l1
        printf "dims load, daily reload: %d rows = %8.0f rows/s\n", n, l2
        printf "redis-benchmark -t hset -P 64:               %8.0f requests/s\n", h
        printf "redis-benchmark hset, same rows, no checks:  %8.0f rows/s\n", s
        printf "loader / hset           = %.2f (goal >= 0.50)\n", l1 / h
        printf "loader / same-row hset  = %.2f (goal >= 0.80)\n", l1 / s
        m = 1000000 / n
        printf "redis-server CPU per 1 M rows: first load %.2f s, reload %.2f s, same-row hset %.2f s (hset / first load = %.2f)\n", f * m, r * m, b * m, (f > 0 ? b / f : 0)
    }'
}

# _dims_server_cpu PORT: redis-server's CPU seconds so far (user + system).
_dims_server_cpu() {
    redis-cli -p "$1" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.3f", s}'
}

# _dims_cleanup_keys PORT PREFIX: unlink every key under PREFIX (never an
# empty or short prefix).
_dims_cleanup_keys() {
    local port="$1" prefix="$2"
    [[ "$prefix" == bench*.dims. ]] || return 0
    redis-cli -p "$port" --scan --pattern "${prefix}*" | xargs -r -n 10000 redis-cli -p "$port" unlink >/dev/null
}
