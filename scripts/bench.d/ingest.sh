# shellcheck shell=bash
# scripts/bench ingest: ingest throughput next to a bare consume→produce
# passthrough on the same broker, same data, same run. Sourced by scripts/bench
# (which provides BIN, WORK, COUNT, pids, vp_* helpers).
bench_main() {
    export VIDPULSE_TOPIC_PREFIX="bench$(date +%s)."
    export VIDPULSE_LOG=warn
    "$BIN/vidpulse" topics create >/dev/null
    vp_log "generating $COUNT raw records (all 9 formats, no bad records) under prefix $VIDPULSE_TOPIC_PREFIX"
    "$BIN/vidpulse-gen" --count "$COUNT" --seed 1 --truth "$WORK/truth.json" >/dev/null
    local raw events
    raw="$(IFS=,; echo "video_events,video_messages,play_request,live_streaming_log,live_gift_total,live_room_events,video_production_log,video_consumption_log,user_actions")"
    events="$(jq '.expected.events' "$WORK/truth.json")"

    vp_log "passthrough: consume → produce, no processing"
    "$BIN/vidpulse-bench" passthrough --input "$raw" --output bench.passthrough >"$WORK/passthrough.log" 2>&1 &
    pids+=($!)
    local p_line i_line
    p_line="$("$BIN/vidpulse-bench" measure --topic bench.passthrough --expect "$COUNT" --label passthrough)"
    kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true

    vp_log "ingest: consume → parse JSON → map → protobuf → produce"
    "$BIN/vidpulse-ingest" --admin-addr 127.0.0.1:0 >"$WORK/ingest.log" 2>&1 &
    pids+=($!)
    i_line="$("$BIN/vidpulse-bench" measure --topic vp.events.v1 --expect "$events" --label ingest)"
    kill -TERM "${pids[-1]}"; wait "${pids[-1]}" || true

    echo "$p_line"
    echo "$i_line"
    local p i
    p="$(sed -E 's/.*= ([0-9]+) records.*/\1/' <<<"$p_line")"
    i="$(sed -E 's/.*= ([0-9]+) records.*/\1/' <<<"$i_line")"
    awk -v p="$p" -v i="$i" 'BEGIN { printf "ingest / passthrough = %.2f (goal >= 0.80)\n", i / p }'
}

