"""scripts/bench scale: waits until every metric and leaderboard that `vidpulse query` prints
equals gen's truth; prints {"compared": N, "differ": [names still different at the deadline], "events": the
distinct valid events gen wrote}.

    python3 scale_truth.py TRUTH.json VIDPULSE-BIN DEADLINE-SECONDS [SKIP-NAME…]

The truth file is read once (it can be hundreds of MB); rows are compared as sets of canonical
JSON texts, as the e2e tests do.
"""

import json
import subprocess
import sys
import time


def canon(rows):
    return sorted(json.dumps(r, sort_keys=True, separators=(",", ":")) for r in rows)


def query(bin_, name):
    out = subprocess.run([bin_, "query", name, "--format", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return canon(json.loads(line) for line in out.stdout.splitlines() if line.strip())


def main():
    truth_path, bin_, deadline = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
    skip = set(sys.argv[4:])
    with open(truth_path) as f:
        truth = json.load(f)
    want = {
        name: canon(rows)
        for section in ("metrics", "leaderboards")
        for name, rows in truth[section].items()
        if name not in skip
    }
    events = truth["expected"]["events"]
    del truth
    while True:
        differ = [name for name, rows in want.items() if query(bin_, name) != rows]
        if not differ or time.time() >= deadline:
            print(json.dumps({"compared": len(want), "differ": differ, "events": events}))
            return
        time.sleep(5)


if __name__ == "__main__":
    main()
