# shellcheck shell=bash
# scripts/bench scale: a compressed day of a mid-size platform through the whole pipeline, for the
# figures of state that must not grow with time (issue 14).
#
#   gen (BENCH_SCALE_COUNT raw records at BENCH_SCALE_RATE/s, a 24 h event-time span, 1 M users,
#   100 k videos, 2 000 rooms) → ingest → monitor (site-wide pool "all") → 2 aggregator instances
#   over the 8 partitions of each input, default flags, on the local stack. It prints:
#     - each aggregator's peak RSS, and its RSS at the middle and at the end of the run;
#     - checkpoint bytes written per 1 000 records the aggregators read, per quarter of the run;
#     - Redis memory held by the checkpoint hashes (peak);
#     - kill -9 of one instance at 80 %: seconds until the restarted instance restored its first
#       partition, all of them (reading again), and the group caught up (the group's committed lag
#       back to where it was in the 6 s before the kill, or under BENCH_SCALE_CAUGHT_UP records,
#       default 20 000, whichever is more);
#     - whether every metric and leaderboard equals gen's truth at the end;
#     - p50 / p99 of the dashboard's snapshot (/api/live/snapshot, every panel) and of
#       `vidpulse query <metric> --rollup 1h --from <day>` on the day's data;
#     - a full replay's rate (a third instance under another group, into another database and
#       Redis db) next to the live rate.
#
# Sourced by scripts/bench (which provides BIN, WORK, COUNT, pids, vp_* helpers).
#   BENCH_SCALE_COUNT=20000000 BENCH_SCALE_RATE=40000 scripts/bench scale     (the issue's day)
#     (on 24 GB, start the stack with VIDPULSE_KAFKA_STORAGE=sqlite first: the in-memory broker
#     holds every topic, 15.5 GB at 16 M raw records, beside gen's truth, 6.3 GB)
#   BENCH_SCALE_COUNT=400000 scripts/bench scale                              (a quick look)
#   BENCH_SCALE_LOG=info … keeps the stages' info logs (in .work/bench/scale/).
#   Each aggregator instance is a static group member (--group-instance-id agg-PORT), as the
#   shipped StatefulSet's pods are (their pod name): the restarted instance takes its partitions
#   back without waiting out the dead member's session.
#   BENCH_SCALE_DYNAMIC=1 … dynamic members instead (a Deployment's pods): the restart waits for
#     the session timeout (10 s) and a rebalance of the whole group.

_sc_rss_mb() { # _sc_rss_mb PID: resident set in MB (0 when gone)
    awk '/^VmRSS/ {printf "%d", $2 / 1024; found=1} END {if (!found) printf "0"}' "/proc/$1/status" 2>/dev/null || echo 0
}

_sc_ckpt_redis_bytes() { # bytes Redis holds for this run's checkpoint hashes
    local cli=(redis-cli -p "${VIDPULSE_REDIS_PORT:-6379}")
    "${cli[@]}" --scan --pattern "vp:ckpt:{${VIDPULSE_TOPIC_PREFIX}*" 2>/dev/null \
        | while read -r k; do "${cli[@]}" memory usage "$k" samples 0; done \
        | awk '{s+=$1} END {printf "%d", s}'
}

_sc_agg() { # _sc_agg PORT LOG [ARGS…]: starts an aggregator instance; prints its pid
    local port="$1" log="$2"
    shift 2
    [[ -n "${BENCH_SCALE_DYNAMIC:-}" ]] || set -- --group-instance-id "agg-$port" "$@"
    "$BIN/vidpulse-aggregator" --admin-addr "127.0.0.1:$port" "$@" >>"$log" 2>&1 &
    echo $!
}

_sc_percentiles() { # stdin: one duration (s) per line → "p50 X ms, p99 Y ms (n runs)"
    sort -n | awk '{v[NR]=$1} END {
        p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1];
        printf "p50 %.0f ms, p99 %.0f ms (%d runs)", p50 * 1000, p99 * 1000, NR }'
}

bench_main() {
    local count="${BENCH_SCALE_COUNT:-2000000}" rate="${BENCH_SCALE_RATE:-20000}"
    local caught_up="${BENCH_SCALE_CAUGHT_UP:-20000}" day="2021-08-16"
    export VIDPULSE_TOPIC_PREFIX="benchscale$(date +%s)."
    export VIDPULSE_LOG="${BENCH_SCALE_LOG:-warn}"
    local pm=19331 pa1=19332 pa2=19333 papi=19334 prep=19335
    local log="$WORK/scale"
    rm -rf "$log" && mkdir -p "$log"
    "$BIN/vidpulse" topics create >/dev/null
    "$BIN/vidpulse" pool create all >/dev/null

    "$BIN/vidpulse-ingest" --admin-addr 127.0.0.1:19330 >"$log/ingest.log" 2>&1 &
    pids+=($!)
    "$BIN/vidpulse-monitor" --pool all --no-enrich --admin-addr "127.0.0.1:$pm" >"$log/monitor.log" 2>&1 &
    pids+=($!)
    local a1 a2
    a1=$(_sc_agg "$pa1" "$log/aggregator-1.log")
    a2=$(_sc_agg "$pa2" "$log/aggregator-2.log")
    pids+=("$a1" "$a2")

    local secs=$((count / rate))
    vp_log "gen: $count raw records at $rate/s (~${secs}s), a 24 h span, 1 M users, 100 k videos, 2 000 rooms"
    "$BIN/vidpulse-gen" --count "$count" --rate "$rate" --span 24h --start "${day}T00:00:00Z" \
        --users 1000000 --videos 100000 --rooms 2000 --truth "$log/truth.json" >"$log/gen.log" 2>&1 &
    local gen=$!
    pids+=("$gen")

    # Samples every second: t, input read (both instances), checkpoint bytes, RSS of each.
    local t0=$SECONDS kill_at=$((secs * 8 / 10)) killed="" t_kill=0 t_assigned="" t_restored="" t_caught="" lag_secs=0
    local lag_before=0 read_dead=0 ckpt_dead=0 peak1=0 peak2=0 mid1="" mid2="" redis_peak=0 n=0
    : >"$log/samples"
    while kill -0 "$gen" 2>/dev/null || [[ $((SECONDS - t0)) -lt 5 ]]; do
        local t=$((SECONDS - t0)) r1 r2 c1 c2 m1 m2
        r1=$(vp_prom_sum "$pa1" vidpulse_records_received_total 'stage="aggregator"' || true)
        r2=$(vp_prom_sum "$pa2" vidpulse_records_received_total 'stage="aggregator"' || true)
        c1=$(vp_prom_sum "$pa1" vidpulse_aggregator_checkpoint_bytes_total || true)
        c2=$(vp_prom_sum "$pa2" vidpulse_aggregator_checkpoint_bytes_total || true)
        m1=$(_sc_rss_mb "$a1")
        m2=$(_sc_rss_mb "$a2")
        ((m1 > peak1)) && peak1=$m1
        ((m2 > peak2)) && peak2=$m2
        if [[ -z "$mid1" && $t -ge $((secs / 2)) ]]; then mid1=$m1 mid2=$m2; fi
        if ((n % 10 == 0)); then
            local rb
            rb=$(_sc_ckpt_redis_bytes)
            ((rb > redis_peak)) && redis_peak=$rb
        fi
        n=$((n + 1))
        echo "$t $((read_dead + ${r1:-0} + ${r2:-0})) $((ckpt_dead + ${c1:-0} + ${c2:-0})) $m1 $m2" >>"$log/samples"
        # The group's committed lag in the seconds before the kill: what "caught up" returns to
        # (offsets are committed after each flush, so a healthy group lags by a few seconds).
        if [[ -z "$killed" && $t -ge $((kill_at - 6)) && $t -lt $kill_at ]]; then
            local lb
            lb=$("$BIN/vidpulse" lag --json --group vidpulse-aggregator 2>/dev/null | jq -s 'map(.lag) | add' || true)
            if [[ -n "$lb" ]] && ((lb > lag_before)); then lag_before=$lb; fi
        fi
        if [[ -z "$killed" && $t -ge $kill_at ]]; then
            ((lag_before <= caught_up)) || caught_up=$lag_before
            vp_log "kill -9 of aggregator 1 at ${t}s (80 %); restarting it"
            read_dead=$((read_dead + ${r1:-0}))
            ckpt_dead=$((ckpt_dead + ${c1:-0}))
            kill -9 "$a1"
            killed=1 t_kill=$(date +%s.%N)
            vp_wait_port_closed "$pa1" 10 || true
            a1=$(_sc_agg "$pa1" "$log/aggregator-1.log")
            pids+=("$a1")
            # Followed closely (gen goes on meanwhile): assigned, restored, caught up.
            local until=$((SECONDS + 120)) owned restored lag lag_t0
            while [[ $SECONDS -lt $until && -z "$t_caught" ]]; do
                owned=$(vp_prom_sum "$pa1" vidpulse_aggregator_partitions_owned || true)
                restored=$(vp_prom_sum "$pa1" vidpulse_aggregator_checkpoints_restored_total || true)
                if [[ -z "$t_assigned" && "${owned:-0}" -gt 0 ]]; then t_assigned=$(date +%s.%N); fi
                if [[ -z "$t_restored" && "${restored:-0}" -gt 0 ]]; then t_restored=$(date +%s.%N); fi
                # The lag only once every partition is back (a query takes a second or more:
                # asked earlier, it would hide when that happened).
                if [[ -n "$t_assigned" ]]; then
                    lag_t0=$(date +%s.%N)
                    lag=$("$BIN/vidpulse" lag --json --group vidpulse-aggregator 2>/dev/null | jq -s 'map(.lag) | add' || true)
                    if [[ -n "$lag" && "$lag" -le "$caught_up" ]]; then
                        t_caught=$(date +%s.%N)
                        lag_secs=$(echo "$t_caught - $lag_t0" | bc -l)
                    fi
                fi
                sleep 0.1
            done
        fi
        sleep 1
    done
    local live_secs=$((SECONDS - t0))
    vp_log "gen done after ${live_secs}s; waiting for every window to close and the totals to settle"

    # The end: every value equal to the truth (windows close once ingest marks its sources idle).
    # Not gifts_by_module_1m: its module comes from the monitor's enrichment, left out here.
    local exact t_end=$SECONDS diff names
    exact="$(python3 "$VP_ROOT/scripts/bench.d/scale_truth.py" "$log/truth.json" "$BIN/vidpulse" 900 gifts_by_module_1m)"
    t_end=$((SECONDS - t_end))
    diff="$(jq -r '.differ | join(" ")' <<<"$exact")"
    names="$(jq -r '.compared' <<<"$exact")"

    # Queries on the day's data.
    "$BIN/vidpulse-api" --listen "127.0.0.1:$papi" --live-at "${day}T23:59:00Z" --live-interval 200ms >"$log/api.log" 2>&1 &
    pids+=($!)
    vp_wait_port "$papi" 30 || true
    local snap rollup m panels="" p
    # A request 250 ms after the last finds the snapshot stale (--live-interval 200ms) and waits
    # for one built for it: every panel queried. Each snapshot says what each panel took.
    snap=$(for i in $(seq 1 50); do
        sleep 0.25
        curl -s -o "$log/snapshot.$i.json" -w '%{time_total}\n' "http://127.0.0.1:$papi/api/live/snapshot" || true
    done | _sc_percentiles)
    # The answer may be a snapshot the poller had just built: its build time is the figure.
    panels=$(printf '\n  %-26s %s' "(whole snapshot, built)" "$(jq -r '.build_ms // empty' "$log"/snapshot.*.json \
        | awk '{print $1 / 1000}' | _sc_percentiles)")
    for p in $(jq -r '.panels | keys[]' "$log/snapshot.1.json" 2>/dev/null); do
        panels+=$(printf '\n  %-26s %s' "$p" "$(jq -r --arg p "$p" '.panels[$p].build_ms // empty' "$log"/snapshot.*.json \
            | awk '{print $1 / 1000}' | _sc_percentiles)")
    done
    rm -f "$log"/snapshot.*.json
    # Per metric: its cost follows the rows it returns (video_plays_1m has a row per video and hour).
    rollup=""
    for m in user_actions_1m gifts_by_type_1m video_plays_1m; do
        local rows
        rows=$("$BIN/vidpulse" query "$m" --rollup 1h --from "$day" --format json 2>/dev/null | wc -l)
        rollup+="$(printf '\n  %-17s %7s rows: ' "$m" "$rows")$(for _ in $(seq 1 10); do
            local s e
            s=$(date +%s.%N)
            "$BIN/vidpulse" query "$m" --rollup 1h --from "$day" >/dev/null 2>&1
            e=$(date +%s.%N)
            awk -v a="$s" -v b="$e" 'BEGIN {print b - a}'
        done | _sc_percentiles)"
    done

    # A full replay: another group, into another database and Redis db.
    vp_log "replay: a third instance under another group reads both inputs from the start"
    local total
    total=$(($(jq -r '.events' <<<"$exact") * 2))
    local rp t_first="" t_done=""
    rp=$(_sc_agg "$prep" "$log/replay.log" --group scale-replay --clickhouse-database vidpulse_scale_replay \
        --redis-url "redis://127.0.0.1:${VIDPULSE_REDIS_PORT:-6379}/3")
    pids+=("$rp")
    local deadline=$((SECONDS + 1800))
    while [[ $SECONDS -lt $deadline ]]; do
        local got u
        got=$(vp_prom_sum "$prep" vidpulse_records_received_total 'stage="aggregator"' || true)
        u=$(vp_prom_sum "$prep" vidpulse_aggregator_records_unflushed || true)
        if [[ -z "$t_first" && "${got:-0}" -gt 0 ]]; then t_first=$(date +%s.%N); fi
        if [[ "${got:-0}" -ge "$total" && "${u:-1}" -eq 0 ]]; then t_done=$(date +%s.%N); break; fi
        sleep 0.2
    done
    kill -TERM "$rp" 2>/dev/null || true
    wait "$rp" 2>/dev/null || true
    curl -sf "http://127.0.0.1:${VIDPULSE_CLICKHOUSE_HTTP_PORT:-8123}/" \
        --data-binary "DROP DATABASE IF EXISTS vidpulse_scale_replay" >/dev/null || true
    redis-cli -p "${VIDPULSE_REDIS_PORT:-6379}" -n 3 flushdb >/dev/null || true

    # ---- figures ---------------------------------------------------------------------------------
    echo "scale: $count raw records at $rate/s over a 24 h event-time span; $total aggregator input records (events + monitored)"
    echo "aggregator RSS (MB): instance 1 peak $peak1, instance 2 peak $peak2; at half time $mid1 / $mid2; at the end $(_sc_rss_mb "$a1") / $(_sc_rss_mb "$a2")"
    awk -v q="$live_secs" '
        { t[NR]=$1; r[NR]=$2; c[NR]=$3 }
        END {
            printf "checkpoint KB per 1000 records read, by quarter:";
            prev = 1;
            for (k = 1; k <= 4; k++) {
                last = prev;
                for (i = prev; i <= NR; i++) if (t[i] <= q * k / 4) last = i;
                dr = r[last] - r[prev]; dc = c[last] - c[prev];
                if (dr > 0) printf " %.1f", dc / dr; else printf " -";
                prev = last;
            }
            printf "  (%.0f MB in all)\n", c[NR] / 1e6;
        }' "$log/samples"
    echo "Redis memory held by checkpoints: peak $((redis_peak / 1024 / 1024)) MB (sampled every 10 s)"
    awk -v m="$([[ -n "${BENCH_SCALE_DYNAMIC:-}" ]] && echo dynamic || echo static)" -v k="$t_kill" -v a="${t_assigned:-0}" -v r="${t_restored:-0}" -v c="${t_caught:-0}" -v q="$lag_secs" -v cu="$caught_up" -v lb="$lag_before" '
        function after(x, none) { if (x > 0) return sprintf("%.1fs", x - k); return none }
        BEGIN {
            printf "kill -9 at 80 %% (%s members): restarted instance restored its first partition after %s, all of its partitions (reading) after %s, group caught up (committed lag back to %d records, %d before the kill) after %s (the lag query that saw it took %.1fs)\n",
                m, after(r, "(never)"), after(a, "(never)"), cu, lb, after(c, "(not within 120 s)"), q }'
    if [[ -z "$diff" ]]; then
        echo "exact: all $names metrics and leaderboards equal gen's truth ${t_end}s after gen ended (gifts_by_module_1m not compared: no enrichment)"
    else
        echo "NOT exact: these differ from gen's truth: $diff"
    fi
    echo "dashboard /api/live/snapshot answered: $snap; built, and each panel (side by side):$panels"
    echo "vidpulse query --rollup 1h --from $day: $rollup"
    awk -v n="$total" -v a="${t_first:-0}" -v b="${t_done:-0}" -v lr="$rate" 'BEGIN {
        if (b > 0) printf "replay: %d records in %.1fs = %d records/s; live: gen at %d raw records/s\n", n, b - a, n / (b - a), lr;
        else print "replay: did not finish" }'
    if [[ -z "${BENCH_SCALE_KEEP:-}" ]]; then
        vp_clickhouse_drop_prefix "$VIDPULSE_TOPIC_PREFIX" || true
        # The run's checkpoints and lineage in Redis.
        local pat
        for pat in "vp:ckpt:{${VIDPULSE_TOPIC_PREFIX}*" "vp:lineage:{${VIDPULSE_TOPIC_PREFIX}*"; do
            redis-cli -p "${VIDPULSE_REDIS_PORT:-6379}" --scan --pattern "$pat" |
                xargs -r redis-cli -p "${VIDPULSE_REDIS_PORT:-6379}" unlink >/dev/null || true
        done
    fi
    echo "(tables and checkpoints of prefix $VIDPULSE_TOPIC_PREFIX $([[ -n "${BENCH_SCALE_KEEP:-}" ]] && echo kept || echo dropped); logs in $log)"
}
