# shellcheck shell=bash
# scripts/bench latency: end-to-end latency from raw record to final row, default flags.
#
# Live gifts stamped with the wall clock as they are sent (vidpulse-gen --wall-clock, BENCH_RATE
# records/s for BENCH_DURATION) → raw topic → ingest → aggregator (default flags: in-band
# watermarks, grace 60 s, no early emission, so a window's rows are written once, when it closes)
# → ClickHouse. A poller notes when each gifts_by_type_1m window's rows first appear. A record's
# latency is that moment minus its send time; p50 and p99 are taken over every record of the closed
# windows (records of a window spread evenly over the part of it gen was sending, weighted by gen's
# truth), next to the goal: p99 <= window + grace + 2 s.
#
#   BENCH_RATE=100 BENCH_DURATION=150s scripts/bench latency

bench_main() {
    export VIDPULSE_TOPIC_PREFIX="benchlat$(date +%s)."
    export VIDPULSE_LOG=warn
    local rate="${BENCH_RATE:-100}" dur="${BENCH_DURATION:-150s}" grace_s=60 window_s=60
    local table
    table="$(tr -c 'A-Za-z0-9_\n' '_' <<<"$VIDPULSE_TOPIC_PREFIX")gifts_by_type_1m"
    "$BIN/vidpulse" topics create >/dev/null
    "$BIN/vidpulse-ingest" --admin-addr 127.0.0.1:0 >"$WORK/lat-ingest.log" 2>&1 &
    pids+=($!)
    "$BIN/vidpulse-aggregator" --admin-addr 127.0.0.1:0 >"$WORK/lat-agg.log" 2>&1 &
    pids+=($!)
    sleep 5
    vp_log "sending live gifts at $rate/s for $dur under $VIDPULSE_TOPIC_PREFIX; polling vidpulse.$table"
    local t_start t_end
    t_start="$(date +%s.%N)"
    "$BIN/vidpulse-gen" --formats live_gift_total --wall-clock --rate "$rate" --duration "$dur" \
        --seed 5 --truth "$WORK/lat-truth.json" >"$WORK/lat-gen.log" 2>&1 &
    local gen=$!
    pids+=("$gen")
    : >"$WORK/lat-seen.tsv"
    local deadline=""
    while :; do
        local now
        now="$(date +%s.%N)"
        curl -sf 'http://127.0.0.1:8123/' --data-binary \
            "SELECT toUnixTimestamp(window_start) AS w FROM vidpulse.\`$table\` GROUP BY w FORMAT TSV" 2>/dev/null |
            awk -v t="$now" '{ print $1 "\t" t }' >>"$WORK/lat-seen.tsv" || true
        if [[ -z "$deadline" ]] && ! kill -0 "$gen" 2>/dev/null; then
            t_end="$(date +%s.%N)"
            # The last window closes once the source is idle and the grace has passed.
            deadline="$(awk -v e="$t_end" -v g="$grace_s" -v w="$window_s" 'BEGIN { printf "%d", e + w + g + 30 }')"
        fi
        if [[ -n "$deadline" && "$(date +%s)" -ge "$deadline" ]]; then
            break
        fi
        sleep 0.25
    done
    python3 - "$WORK/lat-truth.json" "$WORK/lat-seen.tsv" "$t_start" "$t_end" "$window_s" "$grace_s" <<'PY'
import json, sys
truth, seen_path = sys.argv[1], sys.argv[2]
t_start, t_end, window, grace = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
first = {}
for line in open(seen_path):
    w, t = line.split("\t")
    w, t = int(w), float(t)
    first[w] = min(first.get(w, t), t)
counts = {}
for r in json.load(open(truth))["metrics"]["gifts_by_type_1m"]:
    ws = r["window_start"]
    from datetime import datetime, timezone
    w = int(datetime.strptime(ws, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
    counts[w] = counts.get(w, 0) + int(r["gifts"])
missing = sorted(w for w in counts if w not in first)
samples = []  # (latency, weight)
delays = []
for w, n in sorted(counts.items()):
    if w not in first:
        continue
    close = w + window
    delays.append(first[w] - close)
    lo, hi = max(w, t_start), min(close, t_end)
    if hi <= lo:
        continue
    steps = 200
    for i in range(steps):
        t = lo + (hi - lo) * (i + 0.5) / steps
        samples.append((first[w] - t, n / steps))
samples.sort()
total = sum(x for _, x in samples)
def q(p):
    acc = 0.0
    for lat, wt in samples:
        acc += wt
        if acc >= p * total:
            return lat
    return samples[-1][0]
print(f"windows: {len(delays)} closed of {len(counts)} (missing: {missing}); records: {int(total)}")
print(f"window final after its end: min {min(delays):.2f} s, max {max(delays):.2f} s (grace {grace} s)")
print(f"latency raw record -> final row: p50 {q(0.5):.1f} s, p99 {q(0.99):.1f} s (goal p99 <= window + grace + 2 s = {window + grace + 2} s)")
PY
}
