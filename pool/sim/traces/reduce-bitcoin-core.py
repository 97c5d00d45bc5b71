#!/usr/bin/env python3
"""Reduce bitcoin-core-ci-stats' job dump to bitcoin-core.csv.

Source: https://github.com/willcl-ark/bitcoin-core-ci-stats (MIT licence,
Copyright (c) 2024 b10c), branch bitcoin-bitcoin-tasks, commit
1d280fec182bd89bd50d9641c9cfb89faed903c0, file tasks.json.gz: every job of
bitcoin/bitcoin's GitHub Actions CI from 2025-09-04 to 2025-10-16.

Usage, from a fetched copy:

  git clone --single-branch --branch bitcoin-bitcoin-tasks \\
      https://github.com/willcl-ark/bitcoin-core-ci-stats /tmp/bitcoin-core-ci-stats
  python3 pool/sim/traces/reduce-bitcoin-core.py /tmp/bitcoin-core-ci-stats pool/sim/traces/bitcoin-core.csv

SRC may be a clone (bare or not; the pinned commit's blob is read with git)
or a tasks.json.gz itself. Python 3 standard library only. Prints what it
dropped and the trace's statistics on standard error.

A row is one job (one runner lease): submit_s is its creation time (when
GitHub queued it) from the window's first, duration_s the time it held its
runner (finalStatusTimestamp - executingTimestamp), pool its platform as
guessed from the job's name. Jobs that never ran (zero duration: aborted
before starting) are dropped; failed and aborted jobs that ran are kept,
since they held a runner. The trace is the 28 days, starting at a
submission, with the most submissions.
"""
import csv
import gzip
import json
import os
import subprocess
import sys
from collections import Counter

COMMIT = "1d280fec182bd89bd50d9641c9cfb89faed903c0"
PATH = "tasks.json.gz"
WINDOW_S = 28 * 86400


def load(src):
    if os.path.isdir(src):
        raw = subprocess.run(["git", "-C", src, "cat-file", "blob", f"{COMMIT}:{PATH}"],
                             check=True, capture_output=True).stdout
    else:
        with open(src, "rb") as f:
            raw = f.read()
    return json.loads(gzip.decompress(raw))


def pool_of(name):
    """The runner platform, guessed from the job's name: the dump does not
    carry runs-on. Cross-compiled Windows builds run on Linux; only their
    test jobs run on Windows."""
    n = name.lower()
    if "macos" in n and "native" in n:
        return "macos"
    if ("windows" in n or "win64" in n) and ("native" in n or "test cross-built" in n):
        return "windows"
    return "linux"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: reduce-bitcoin-core.py SRC OUT.csv")
    src, out = sys.argv[1], sys.argv[2]
    seen, rows, dropped = set(), [], Counter()
    for t in load(src):
        if t["id"] in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(t["id"])
        c, e, f = t.get("creationTimestamp"), t.get("executingTimestamp"), t.get("finalStatusTimestamp")
        if None in (c, e, f) or f - e <= 0:
            dropped["never ran (no duration)"] += 1
            continue
        rows.append((float(c), float(f - e), pool_of(t["name"])))
    # Ties (a matrix is created in one second) keep a fixed order: by
    # duration, then pool.
    rows.sort()

    best, j = (0, 0), 0
    for i in range(len(rows)):
        while j < len(rows) and rows[j][0] < rows[i][0] + WINDOW_S:
            j += 1
        if j - i > best[1] - best[0]:
            best = (i, j)
    win = rows[best[0]:best[1]]
    t0 = win[0][0]

    with open(out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["submit_s", "duration_s", "pool"])
        for s, d, p in win:
            w.writerow([f"{s - t0:.1f}", f"{d:.1f}", p])

    durations = sorted(d for _, d, _ in win)
    print(json.dumps({
        "source_jobs": len(seen) + dropped["duplicate"],
        "dropped": dict(dropped),
        "window_start_unix": int(t0),
        "rows": len(win),
        "per_pool": dict(Counter(p for _, _, p in win).most_common()),
        "duration_s_p50": durations[len(durations) // 2],
        "duration_s_max": durations[-1],
    }, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
