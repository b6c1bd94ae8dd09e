# shellcheck shell=bash
# scripts/bench monitor: the monitor stage's figures, on the same broker in the same run.
#
#   1. a bucketed pool of BENCH_POOL_IDS ids (default 5 000 000) split across 2 instances:
#      import time, load time until both instances hold their buckets, resident memory of each;
#   2. throughput with enrichment (site-wide pool "all": every event passes and is looked up in
#      Redis) next to the bare consume→produce passthrough over the same vp.events.v1, in
#      BENCH_ROUNDS rounds (default 3) of fresh topics and data; the median ratio is the figure.
#
# Sourced by scripts/bench (which provides BIN, WORK, COUNT, pids, vp_* helpers).
#   BENCH_POOL_IDS=1000000 BENCH_COUNT=200000 BENCH_ROUNDS=3 scripts/bench monitor

_mon_metric() { # _mon_metric PORT NAME [LABEL-PATTERN]: sum of a metric's samples
    curl -sf "http://127.0.0.1:$1/metrics" | grep "^$2" | grep -- "${3:-}" | awk '{s+=$2} END {printf "%d", s}'
}

_mon_metric_max() { # _mon_metric_max PORT NAME: largest sample
    curl -sf "http://127.0.0.1:$1/metrics" | grep "^$2" | awk 'BEGIN{m=0} {if ($2>m) m=$2} END {printf "%.2f", m}'
}

_mon_rss() { # _mon_rss PID: "VmRSS / VmHWM" in MiB
    awk '/^VmRSS/ {r=$2} /^VmHWM/ {h=$2} END {printf "%.0f MiB (peak %.0f MiB)", r/1024, h/1024}' "/proc/$1/status"
}

bench_main() {
    export VIDPULSE_TOPIC_PREFIX="benchmon$(date +%s)."
    export VIDPULSE_LOG=warn
    local ids="${BENCH_POOL_IDS:-5000000}"
    local rounds_out=""
    local pa="${BENCH_MONITOR_PORT_A:-19311}" pb="${BENCH_MONITOR_PORT_B:-19312}" pm="${BENCH_MONITOR_PORT:-19313}"
    "$BIN/vidpulse" topics create >/dev/null

    # ---- 1. a bucketed pool across two instances --------------------------------------------
    local import_s="-" load_s="-" line_a="(skipped)" line_b="(skipped)"
    if [[ "$ids" -gt 0 ]]; then
    vp_log "writing $ids ids (v-0 … v-$((ids - 1))) under prefix $VIDPULSE_TOPIC_PREFIX"
    awk -v n="$ids" 'BEGIN { for (i = 0; i < n; i++) printf "v-%d\n", i }' >"$WORK/pool-ids.txt"
    "$BIN/vidpulse" pool create big --match video_id --mode bucketed >/dev/null
    local t0 t1
    t0=$(date +%s.%N)
    "$BIN/vidpulse" pool import big --file "$WORK/pool-ids.txt" >"$WORK/import.log" 2>&1
    t1=$(date +%s.%N)
    import_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')

    vp_log "starting two monitor instances (bucketed pool only, no enrichment)"
    t0=$(date +%s.%N)
    "$BIN/vidpulse-monitor" --pool big --no-enrich --admin-addr "127.0.0.1:$pa" >"$WORK/monitor-a.log" 2>&1 &
    local pid_a=$!
    pids+=("$pid_a")
    "$BIN/vidpulse-monitor" --pool big --no-enrich --admin-addr "127.0.0.1:$pb" >"$WORK/monitor-b.log" 2>&1 &
    local pid_b=$!
    pids+=("$pid_b")
    split_loaded() {
        local la lb ia ib
        la=$(_mon_metric "$pa" vidpulse_monitor_pool_loaded) || return 1
        lb=$(_mon_metric "$pb" vidpulse_monitor_pool_loaded) || return 1
        ia=$(_mon_metric "$pa" vidpulse_monitor_pool_ids) || return 1
        ib=$(_mon_metric "$pb" vidpulse_monitor_pool_ids) || return 1
        [[ "$la" -gt 0 && "$lb" -gt 0 && $((la + lb)) -eq 8 && $((ia + ib)) -eq "$ids" ]]
    }
    vp_wait_for 600 split_loaded || { vp_tail_log "$WORK/monitor-a.log"; vp_die "the pool did not load across both instances"; }
    t1=$(date +%s.%N)
    local ia ib
    load_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    ia=$(_mon_metric "$pa" vidpulse_monitor_pool_ids)
    ib=$(_mon_metric "$pb" vidpulse_monitor_pool_ids)
    line_a="instance A: $ia ids in $(_mon_metric "$pa" vidpulse_monitor_pool_loaded) partitions, slowest partition load $(_mon_metric_max "$pa" vidpulse_monitor_pool_load_seconds) s, RSS $(_mon_rss "$pid_a")"
    line_b="instance B: $ib ids in $(_mon_metric "$pb" vidpulse_monitor_pool_loaded) partitions, slowest partition load $(_mon_metric_max "$pb" vidpulse_monitor_pool_load_seconds) s, RSS $(_mon_rss "$pid_b")"
    kill -TERM "$pid_a" "$pid_b"; wait "$pid_a" "$pid_b" || true
    fi

    # ---- 2. throughput with enrichment next to the passthrough, in rounds ---------------------
    # Single runs swing by ±30 % on a small machine (the broker shares the cores): each round has
    # its own topics and data, runs the passthrough then the monitor back to back, and the figure
    # to quote is the median ratio.
    local rounds="${BENCH_ROUNDS:-3}" r base="$VIDPULSE_TOPIC_PREFIX" ratios=() p_line m_line
    for ((r = 1; r <= rounds; r++)); do
        export VIDPULSE_TOPIC_PREFIX="${base}r$r."
        vp_log "round $r/$rounds: generating $COUNT raw records and normalizing them into vp.events.v1"
        bench_normalized "$r" "$WORK/truth.json" "$WORK/ingest.log"
        local events="$BENCH_EVENTS"

        vp_log "passthrough: consume → produce vp.events.v1, no processing"
        "$BIN/vidpulse-bench" passthrough --input vp.events.v1 --output bench.passthrough >"$WORK/passthrough.log" 2>&1 &
        pids+=($!)
        p_line="$("$BIN/vidpulse-bench" measure --topic bench.passthrough --expect "$events" --label passthrough)"
        kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true

        vp_log "monitor: consume → decode → pool \"all\" → Redis lookups (batched, cached) → produce"
        "$BIN/vidpulse" pool create all >/dev/null
        "$BIN/vidpulse-monitor" --pool all --admin-addr "127.0.0.1:$pm" >"$WORK/monitor.log" 2>&1 &
        pids+=($!)
        m_line="$("$BIN/vidpulse-bench" measure --topic vp.monitored.v1 --expect "$events" --label "monitor+enrich")"
        local hit redis_p50 misses
        hit=$(curl -sf "http://127.0.0.1:$pm/metrics" | awk '/^vidpulse_monitor_cache_hit_ratio / {printf "%.3f", $2}')
        redis_p50=$(curl -sf "http://127.0.0.1:$pm/metrics" | awk '/^vidpulse_monitor_redis_seconds\{quantile="0.5"\}/ {printf "%.2f ms", $2 * 1000}')
        misses=$(_mon_metric "$pm" vidpulse_monitor_enrich_misses_total)
        kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true
        ratios+=("$(bench_ratio "$m_line" "$p_line")")
        rounds_out+="round $r: $p_line"$'\n'"round $r: $m_line  (cache hit ratio $hit, Redis round trip p50 $redis_p50, dimension misses $misses)"$'\n'"round $r: monitor / passthrough = ${ratios[-1]}"$'\n'
    done

    echo "pool: $ids ids imported in $import_s s; loaded across 2 instances $load_s s after start (group join included)"
    echo "  $line_a"
    echo "  $line_b"
    printf '%s' "$rounds_out"
    bench_median "monitor / passthrough" "${ratios[@]}"
}
