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
#     without any version check: the ceiling for these rows.
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
    local first reload
    first="$("$BIN/vidpulse" dims load --kind viewer --file "$file" --key-prefix "${prefix}viewer:" --json)"
    vp_log "loader: $rows rows, daily reload (same keys, newer as-of)"
    reload="$("$BIN/vidpulse" dims load --kind viewer --file "$file" --key-prefix "${prefix}viewer:" --json)"
    for s in "$first" "$reload"; do
        [[ "$(jq '.loaded' <<<"$s")" == "$rows" ]] || vp_die "loader did not load every row: $s"
    done

    vp_log "redis-benchmark -t hset -n $rows -P 64"
    local hset same
    hset="$(redis-benchmark -p "$port" -t hset -n "$rows" -P 64 -q 2>/dev/null | tr '\r' '\n' |
        grep -Eo '[0-9.]+ requests per second' | tail -n1 | cut -d' ' -f1)"
    redis-cli -p "$port" unlink myhash >/dev/null
    vp_log "redis-benchmark hset of the same 4-field rows into new keys, -P 64"
    same="$(redis-benchmark -p "$port" -n "$rows" -r 1000000000 -P 64 -q \
        hset "${prefix}plain:__rand_int__" province 浙江 grade 3 region 1122 gender f 2>/dev/null |
        tr '\r' '\n' | grep -Eo '[0-9.]+ requests per second' | tail -n1 | cut -d' ' -f1)"

    local l1 l2
    l1="$(jq '.rows / .seconds' <<<"$first")"
    l2="$(jq '.rows / .seconds' <<<"$reload")"
    _dims_cleanup_keys "$port" "$prefix"
    awk -v l1="$l1" -v l2="$l2" -v h="$hset" -v s="$same" -v n="$rows" 'BEGIN {
        printf "dims load, first load:   %d rows = %8.0f rows/s\n", n, l1
        printf "dims load, daily reload: %d rows = %8.0f rows/s\n", n, l2
        printf "redis-benchmark -t hset -P 64:               %8.0f requests/s\n", h
        printf "redis-benchmark hset, same rows, no checks:  %8.0f rows/s\n", s
        printf "loader / hset           = %.2f (goal >= 0.50)\n", l1 / h
        printf "loader / same-row hset  = %.2f\n", l1 / s
    }'
}

# _dims_cleanup_keys PORT PREFIX: unlink every key under PREFIX (never an
# empty or short prefix).
_dims_cleanup_keys() {
    local port="$1" prefix="$2"
    [[ "$prefix" == bench*.dims. ]] || return 0
    redis-cli -p "$port" --scan --pattern "${prefix}*" | xargs -r -n 10000 redis-cli -p "$port" unlink >/dev/null
}
