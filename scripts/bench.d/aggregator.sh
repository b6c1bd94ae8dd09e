# shellcheck shell=bash
# scripts/bench aggregator: the aggregator's figures, on the same broker in the same run.
#
#   1. the windowed-aggregation core alone, no Kafka and no sinks: COUNT raw records written to a
#      file by vidpulse-gen --out-file, normalized once (not timed), then the built-in spec's
#      state machines on one thread (crates/aggregator/examples/bench_core.rs): records per second
#      per core, processing only and with flushes (emission + checkpoint deltas);
#   2. the whole stage (consume → decode → windows → ClickHouse rows, Redis leaderboards and
#      checkpoints) over vp.events.v1 and vp.monitored.v1 (a site-wide monitor pool "all"), next
#      to the bare consume → produce passthrough over the same two topics, in BENCH_ROUNDS rounds
#      (default 3) of fresh topics and data: single runs swing by ±30 % on a small machine, the
#      median ratio is the figure.
#
# Sourced by scripts/bench (which provides BIN, WORK, COUNT, pids, vp_* helpers).
#   BENCH_COUNT=200000 BENCH_ROUNDS=3 scripts/bench aggregator

bench_main() {
    export VIDPULSE_TOPIC_PREFIX="benchagg$(date +%s)."
    export VIDPULSE_LOG=warn
    local pm="${BENCH_MONITOR_PORT:-19323}" pa="${BENCH_AGGREGATOR_PORT:-19324}"
    "$BIN/vidpulse" topics create >/dev/null

    # ---- 1. the core alone on a file of events ---------------------------------------------------
    vp_log "core: $COUNT raw records to a file, normalized once, aggregated on one thread"
    "$BIN/vidpulse-gen" --count "$COUNT" --seed 1 --out-file "$WORK/agg-raw.jsonl" \
        --truth "$WORK/agg-file-truth.json" >/dev/null 2>&1
    cargo build --release --locked -p vidpulse-aggregator --example bench_core --quiet
    local core
    core="$("$VP_ROOT/target/release/examples/bench_core" "$WORK/agg-raw.jsonl" 2>/dev/null)"

    # ---- 2. the stage next to the passthrough ----------------------------------------------------
    local rounds="${BENCH_ROUNDS:-3}" r base="$VIDPULSE_TOPIC_PREFIX" ratios=() rounds_out="" p_line a_line
    for ((r = 1; r <= rounds; r++)); do
        export VIDPULSE_TOPIC_PREFIX="${base}r$r."
        vp_log "round $r/$rounds: generating $COUNT raw records, normalizing them into vp.events.v1"
        bench_normalized "$r" "$WORK/agg-truth.json" "$WORK/agg-ingest.log"
        local events="$BENCH_EVENTS"

        vp_log "monitor with a site-wide pool \"all\" (no enrichment) into vp.monitored.v1"
        "$BIN/vidpulse" pool create all >/dev/null
        "$BIN/vidpulse-monitor" --pool all --no-enrich --admin-addr "127.0.0.1:$pm" >"$WORK/agg-monitor.log" 2>&1 &
        pids+=($!)
        "$BIN/vidpulse-bench" measure --topic vp.monitored.v1 --expect "$events" --label monitor >/dev/null
        kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true
        local total=$((events * 2))

        vp_log "passthrough: consume → produce vp.events.v1 + vp.monitored.v1, no processing"
        "$BIN/vidpulse-bench" passthrough --input vp.events.v1,vp.monitored.v1 --output bench.passthrough \
            >"$WORK/agg-passthrough.log" 2>&1 &
        pids+=($!)
        p_line="$("$BIN/vidpulse-bench" measure --topic bench.passthrough --expect "$total" --label passthrough)"
        kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true

        # The stage writes no topic to time: read its own counters (polled every 50 ms). The clock
        # starts at its first record (group join excluded, as for the passthrough) and the rate is
        # taken when every record was read: the flushes made on the way (every --flush-max-rows
        # records) are inside it. The last records are flushed at the next --flush-interval (2 s),
        # a latency setting and not work: the time until every row, leaderboard and checkpoint is
        # written is printed beside the rate, not divided into it.
        vp_log "aggregator: consume → decode → windows → ClickHouse, Redis (grace 1h: no event is late)"
        "$BIN/vidpulse-aggregator" --admin-addr "127.0.0.1:$pa" --grace 1h >"$WORK/agg-aggregator.log" 2>&1 &
        pids+=($!)
        local t_first="" t_read="" t_done="" n u
        local deadline=$((SECONDS + 900))
        while [[ $SECONDS -lt $deadline ]]; do
            n=$(vp_prom_sum "$pa" vidpulse_records_received_total 'stage="aggregator"' 2>/dev/null || echo 0)
            u=$(vp_prom_sum "$pa" vidpulse_aggregator_records_unflushed 2>/dev/null || echo 1)
            if [[ -z "$t_first" && "${n:-0}" -gt 0 ]]; then t_first=$(date +%s.%N); fi
            if [[ -z "$t_read" && "${n:-0}" -ge "$total" ]]; then t_read=$(date +%s.%N); fi
            if [[ -n "$t_read" && "${u:-1}" -eq 0 ]]; then
                t_done=$(date +%s.%N)
                break
            fi
            sleep 0.05
        done
        [[ -n "$t_done" ]] || { vp_tail_log "$WORK/agg-aggregator.log"; vp_die "the aggregator did not read all $total records"; }
        local rows
        rows=$(vp_prom_sum "$pa" vidpulse_aggregator_rows_written_total)
        kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true
        a_line=$(awk -v n="$total" -v a="$t_first" -v b="$t_read" -v d="$t_done" -v r="$rows" \
            'BEGIN { printf "aggregator: %d records in %.2f s = %d records/s (all flushed %.2f s after the last was read; %d ClickHouse rows written)", n, b - a, n / (b - a), d - b, r }')

        vp_clickhouse_drop_prefix "$VIDPULSE_TOPIC_PREFIX" || true
        ratios+=("$(bench_ratio "$a_line" "$p_line")")
        rounds_out+="round $r: $p_line"$'\n'"round $r: $a_line"$'\n'"round $r: aggregator / passthrough = ${ratios[-1]}"$'\n'
    done

    echo "$core"
    printf '%s' "$rounds_out"
    bench_median "aggregator / passthrough" "${ratios[@]}"
}
