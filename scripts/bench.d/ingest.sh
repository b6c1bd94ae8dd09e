# shellcheck shell=bash
# scripts/bench ingest: ingest throughput next to a bare consume→produce
# passthrough (the same core loop, no processing) on the same broker and the
# same data. Sourced by scripts/bench (which provides BIN, WORK, COUNT, pids,
# vp_* helpers).
#
#   BENCH_COUNT=300000 BENCH_ROUNDS=3 scripts/bench ingest
#
# On a small machine the broker shares the cores with the stage, so single
# runs swing by ±30 %: each round generates fresh topics and runs passthrough
# then ingest back to back; the figure to quote is the median ratio. Each
# line also gives CPU seconds per 100 k records of the stage process and of
# the broker (steadier than rates when the machine is busy).
#
# The rounds run on a private, empty nisshi broker (memory storage) on a
# spare port: nisshi's memory store spends CPU per produce request in
# proportion to the topics it holds, so a shared broker that has served
# many test runs gives slower and noisier figures. BENCH_SHARED_BROKER=1
# uses the stack's broker instead.
bench_main() {
    export VIDPULSE_LOG=warn
    [[ -n "${BENCH_SHARED_BROKER:-}" ]] || _private_broker
    local rounds="${BENCH_ROUNDS:-3}" r ratios=()
    local raw="video_events,video_messages,play_request,live_streaming_log,live_gift_total,live_room_events,video_production_log,video_consumption_log,user_actions"
    local broker
    broker="$(_broker_pid)"
    for ((r = 1; r <= rounds; r++)); do
        export VIDPULSE_TOPIC_PREFIX="bench$(date +%s)r$r."
        "$BIN/vidpulse" topics create >/dev/null
        vp_log "round $r/$rounds: generating $COUNT raw records (all 9 formats, no bad records) under $VIDPULSE_TOPIC_PREFIX"
        "$BIN/vidpulse-gen" --count "$COUNT" --seed "$r" --truth "$WORK/truth.json" >/dev/null
        local events p_line i_line
        events="$(jq '.expected.events' "$WORK/truth.json")"
        p_line="$(_ingest_bench_run passthrough bench.passthrough "$COUNT" "$broker" \
            "$BIN/vidpulse-bench" passthrough --input "$raw" --output bench.passthrough)"
        i_line="$(_ingest_bench_run ingest vp.events.v1 "$events" "$broker" \
            "$BIN/vidpulse-ingest" --admin-addr 127.0.0.1:0 ${BENCH_INGEST_ARGS:-})"
        echo "$p_line"
        echo "$i_line"
        ratios+=("$(bench_ratio "$i_line" "$p_line")")
        echo "round $r: ingest / passthrough = ${ratios[-1]}"
    done
    bench_median "ingest / passthrough" "${ratios[@]}"
}

# _ingest_bench_run LABEL TOPIC EXPECT BROKER_PID CMD...: runs CMD until TOPIC
# holds EXPECT records; prints the rate line plus CPU s / 100 k records of the
# process and of the broker.
_ingest_bench_run() {
    local label="$1" topic="$2" expect="$3" broker="$4"
    shift 4
    local b0=0 line pid
    [[ -n "$broker" ]] && b0="$(_cpu_ticks "$broker")"
    "$@" >"$WORK/$label.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    line="$("$BIN/vidpulse-bench" measure --topic "$topic" --expect "$expect" --label "$label")"
    local own b1=0
    own="$(_cpu_ticks "$pid")"
    [[ -n "$broker" ]] && b1="$(_cpu_ticks "$broker")"
    kill -TERM "$pid"
    wait "$pid" || true
    awk -v l="$line" -v o="$own" -v b="$((b1 - b0))" -v n="$expect" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        printf "%s; CPU per 100k: stage %.2f s, broker %.2f s\n", l, o / hz * 100000 / n, b / hz * 100000 / n }'
}

# _private_broker: starts an empty nisshi on a spare port for this run and
# points VIDPULSE_KAFKA_BROKERS at it (stopped by the EXIT trap).
_private_broker() {
    local port="${BENCH_BROKER_PORT:-19092}" dir="$WORK/broker"
    vp_port_open "$port" && vp_die "port $port is taken; set BENCH_BROKER_PORT or BENCH_SHARED_BROKER=1"
    mkdir -p "$dir"
    (cd "$dir" && exec "$VP_CARGO_BIN/nisshi" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://nisshi/) >"$dir/log" 2>&1 &
    pids+=($!)
    vp_wait_port "$port" 30 || vp_die "private broker did not start; see $dir/log"
    export VIDPULSE_KAFKA_BROKERS="127.0.0.1:$port"
    vp_log "private broker on 127.0.0.1:$port (pid $!)"
}

# _broker_pid: pid of the nisshi broker listening on VIDPULSE_KAFKA_BROKERS's
# port, or nothing.
_broker_pid() {
    local port="${VIDPULSE_KAFKA_BROKERS##*:}" p
    for p in $(pgrep -f 'nisshi broker' || true); do
        local cmd
        cmd="$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null || true)"
        if [[ "$cmd" =~ tcp://[^\ ]*:$port\  ]]; then
            echo "$p"
            return
        fi
    done
}

# _cpu_ticks PID: user + system CPU ticks of a process so far.
_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
