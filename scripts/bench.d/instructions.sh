# shellcheck shell=bash
# scripts/bench instructions: instructions executed (valgrind callgrind, whole process, every
# thread) by ingest and by the monitor with enrichment, each next to the bare consume→produce
# passthrough over the same records. Unlike rates these do not move with the machine's load, so
# a change's cost or gain shows in one run; the rate benches remain the figure for speed.
#
#   BENCH_CG_COUNT=30000 scripts/bench instructions
#
# Counts include each process's start-up and group join (a few percent at 30 000 records).
# Sourced by scripts/bench (which provides BIN, WORK, pids, vp_* helpers).

_cg_total() { # _cg_total FILE: the total instruction count callgrind wrote
    awk '/^(summary|totals):/ { print $2; exit }' "$1"
}

# _cg_run NAME TOPIC EXPECT CMD…: runs CMD under callgrind until EXPECT records are on TOPIC, then
# stops it; prints its total instructions.
_cg_run() {
    local name="$1" topic="$2" expect="$3"
    shift 3
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$name.out" "$@" >"$WORK/cg.$name.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    "$BIN/vidpulse-bench" measure --topic "$topic" --expect "$expect" --label "$name" >/dev/null
    kill -TERM "$pid"
    wait "$pid" || true
    _cg_total "$WORK/cg.$name.out"
}

_cg_line() { # _cg_line LABEL STAGE_IR PASS_IR RECORDS
    awk -v l="$1" -v s="$2" -v p="$3" -v n="$4" 'BEGIN {
        printf "%s: %.0f instructions per record (passthrough %.0f); passthrough / stage = %.2f (goal >= 0.80)\n", l, s / n, p / n, p / s }'
}

bench_main() {
    command -v valgrind >/dev/null || vp_apt_install valgrind
    export VIDPULSE_LOG=warn VIDPULSE_TOPIC_PREFIX="benchcg$(date +%s)."
    local n="${BENCH_CG_COUNT:-30000}"
    local raw="video_events,video_messages,play_request,live_streaming_log,live_gift_total,live_room_events,video_production_log,video_consumption_log,user_actions"
    "$BIN/vidpulse" topics create >/dev/null
    vp_log "generating $n raw records under $VIDPULSE_TOPIC_PREFIX"
    "$BIN/vidpulse-gen" --count "$n" --seed 1 --truth "$WORK/truth.json" >/dev/null
    local events
    events="$(jq '.expected.events' "$WORK/truth.json")"

    vp_log "callgrind: passthrough of the raw records, then ingest"
    local p_raw i_ir p_ev m_ir
    p_raw="$(_cg_run passthrough-raw bench.passthrough.raw "$n" "$BIN/vidpulse-bench" passthrough --input "$raw" --output bench.passthrough.raw)"
    i_ir="$(_cg_run ingest vp.events.v1 "$events" "$BIN/vidpulse-ingest" --admin-addr 127.0.0.1:0)"

    vp_log "callgrind: passthrough of the events, then the monitor (pool \"all\", Redis enrichment)"
    "$BIN/vidpulse" pool create all >/dev/null
    p_ev="$(_cg_run passthrough-events bench.passthrough "$events" "$BIN/vidpulse-bench" passthrough --input vp.events.v1 --output bench.passthrough)"
    m_ir="$(_cg_run monitor vp.monitored.v1 "$events" "$BIN/vidpulse-monitor" --pool all --admin-addr 127.0.0.1:0)"

    echo "records: $n raw, $events events (callgrind outputs in $WORK/cg.*.out; callgrind_annotate --inclusive=yes for the breakdown)"
    _cg_line "ingest (per raw record)" "$i_ir" "$p_raw" "$n"
    _cg_line "monitor+enrich (per event)" "$m_ir" "$p_ev" "$events"
}
