# shellcheck shell=bash
# scripts/bench flink: vidpulse against Flink SQL on the same work, same machine, same run.
#
# The work: seed 002's gifts by gift type per 1-minute tumbling window — sum of the amount, count,
# distinct givers — over one file of BENCH_FLINK_COUNT (default 2 000 000) raw live_gift_total
# JSON lines written by vidpulse-gen (seed 2, one day of event time), JSON parsing included on
# both sides:
#   - Flink: PyFlink 2.3 (from PyPI, in a venv under .work/bench, installed once; Java 17), Flink
#     SQL over the filesystem JSON source, event time on create_time, TUMBLE 1 minute, parallelism
#     1 (scripts/bench.d/flink_gifts.py). Run once on a one-line file (its start-up: JVM, planner,
#     mini-cluster, job deployment) and once on the whole file; "without start-up" subtracts the
#     first from the second.
#   - vidpulse: `vidpulse backfill --dry-run --threads 1 --metric gifts_by_type_1m` pinned to one
#     core (taskset -c 0), the whole process (start, read, parse, normalize, aggregate, print),
#     median of BENCH_VP_RUNS (default 3) runs.
# Both outputs are compared row by row (window starts in UTC); the bench fails if they differ.
# Prints rows/s of each, Flink's with and without its start-up, and the ratio (goal: >= 10x
# against Flink without start-up). Figures vary with the load of the shared machine.

_now() { date +%s.%N; }

bench_main() {
    local n="${BENCH_FLINK_COUNT:-2000000}" runs="${BENCH_VP_RUNS:-3}"
    local dir="$WORK/flink" venv="$WORK/flink-venv"
    mkdir -p "$dir"
    command -v java >/dev/null || vp_die "Flink needs Java 17: apt-get install openjdk-17-jre-headless"
    if ! "$venv/bin/python" -c 'import pyflink' 2>/dev/null; then
        vp_log "installing PyFlink 2.3 into $venv (once)"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'apache-flink==2.3.*'
    fi

    local gifts="$dir/gifts-$n.jsonl"
    if [[ ! -s "$gifts" ]]; then
        vp_log "writing $n live_gift_total records (seed 2, one day) to $gifts"
        "$BIN/vidpulse-gen" --count "$n" --formats live_gift_total --seed 2 \
            --start 2021-08-16T00:00:00Z --span 24h --out-file "$dir/gen.jsonl" \
            --truth "$dir/gen-truth.json" >/dev/null 2>&1
        # gen writes {"topic","key","payload"} lines: keep the raw payloads.
        python3 -c '
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as o:
    for l in f:
        o.write(json.loads(l)["payload"] + "\n")
' "$dir/gen.jsonl" "$gifts.tmp"
        mv "$gifts.tmp" "$gifts"
        rm -f "$dir/gen.jsonl"
    fi
    head -n 1 "$gifts" >"$dir/one.jsonl"

    vp_log "Flink: start-up alone (a one-line file)"
    local t0 t1 t2 t3
    t0="$(_now)"
    "$venv/bin/python" "$VP_ROOT/scripts/bench.d/flink_gifts.py" "$dir/one.jsonl" "$dir/flink-one.out" \
        2>"$dir/flink-one.log" || { tail -20 "$dir/flink-one.log" >&2; vp_die "flink failed"; }
    t1="$(_now)"
    vp_log "Flink: $n records, parallelism 1"
    "$venv/bin/python" "$VP_ROOT/scripts/bench.d/flink_gifts.py" "$gifts" "$dir/flink.out" \
        2>"$dir/flink.log" || { tail -20 "$dir/flink.log" >&2; vp_die "flink failed"; }
    t2="$(_now)"

    vp_log "vidpulse backfill --dry-run --threads 1 on core 0: $runs runs"
    local times=()
    for _ in $(seq "$runs"); do
        t3="$(_now)"
        taskset -c 0 "$BIN/vidpulse" backfill --dry-run --threads 1 --no-progress \
            --metric gifts_by_type_1m --preset live_gift_total "$gifts" \
            >"$dir/vidpulse.out" 2>"$dir/vidpulse.log" || { cat "$dir/vidpulse.log" >&2; vp_die "vidpulse failed"; }
        times+=("$(echo "$(_now) - $t3" | bc -l)")
    done
    local vp
    vp="$(printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"

    python3 - "$dir/flink.out" "$dir/vidpulse.out" "$n" "$t0" "$t1" "$t2" "$vp" "${times[*]}" <<'PY'
import json, sys
flink_out, vp_out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0, t1, t2, vp = (float(x) for x in sys.argv[4:8])
runs = sys.argv[8]
def rows(path):
    return sorted(json.dumps(json.loads(l), sort_keys=True) for l in open(path) if l.strip())
a, b = rows(flink_out), rows(vp_out)
if a != b:
    only_f = sorted(set(a) - set(b))[:3]
    only_v = sorted(set(b) - set(a))[:3]
    print(f"flink bench: results DIFFER: flink {len(a)} rows, vidpulse {len(b)}; flink only {only_f}; vidpulse only {only_v}")
    sys.exit(1)
startup, whole = t1 - t0, t2 - t1
work = max(whole - startup, 1e-9)
print(f"records: {n} live_gift_total JSON lines; result: {len(a)} rows (gift type x minute), equal on both sides")
print(f"flink (PyFlink 2.3, parallelism 1): {whole:.2f} s whole = {n / whole:,.0f} records/s with start-up; start-up {startup:.2f} s; {work:.2f} s without = {n / work:,.0f} records/s")
print(f"vidpulse backfill --dry-run, 1 core: {vp:.2f} s whole process (median of {runs}) = {n / vp:,.0f} records/s")
print(f"ratio: {n / vp / (n / work):.1f}x Flink without its start-up, {n / vp / (n / whole):.1f}x with it (goal: 10x without)")
PY
}
