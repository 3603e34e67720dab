"""The table of a compare.sh run: medians across rounds, ratios to no agent per round."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main(prefix: str) -> None:
    runs: dict[str, list[dict]] = defaultdict(list)
    for line in open(prefix + ".jsonl"):
        row = json.loads(line)
        runs[row["variant"]].append(row["run"])
    base = runs["none"]
    med = statistics.median
    print("| variant | /items median µs | ratio | /items p99 µs | p99 ratio | CPU µs/req "
          "| CPU ratio | /error overhead µs | transactions shipped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("none", "this", "other", "ddtrace"):
        rs = runs[name]
        pairs = list(zip(rs, base, strict=True))
        shipped = [((r.get("sink") or {}).get("decoded") or {}).get("elastic", {})
                   .get("transaction") for r in rs]
        print("| %s | %.0f | %.3fx | %.0f | %.2fx | %.0f | %.3fx | %+.0f | %s |" % (
            name, med(r["items"]["median_us"] for r in rs),
            med(r["items"]["median_us"] / b["items"]["median_us"] for r, b in pairs),
            med(r["items"]["p99_us"] for r in rs),
            med(r["items"]["p99_us"] / b["items"]["p99_us"] for r, b in pairs),
            med(r["items"]["cpu_us_per_req"] for r in rs),
            med(r["items"]["cpu_us_per_req"] / b["items"]["cpu_us_per_req"] for r, b in pairs),
            med(r["error"]["median_us"] - b["error"]["median_us"] for r, b in pairs),
            "/".join(str(s) for s in shipped if s is not None) or "-"))
    print()
    print("| micro (1 txn + 10 spans) | CPU µs/txn, all threads, per round | shipped |")
    print("|---|---|---|")
    cpu = {}
    for name in ("this", "other", "ddtrace"):
        rows = [json.loads(line) for line in open(f"{prefix}.micro_{name}.jsonl")]
        cpu[name] = med(r["cpu_us_per_txn"] for r in rows)
        shipped = [((r.get("sink_decoded") or {}).get("elastic") or {}).get("transaction")
                   for r in rows]
        print("| %s | %s | %s |" % (name, ", ".join("%.1f" % r["cpu_us_per_txn"] for r in rows),
                                    "/".join(str(s) for s in shipped if s is not None) or "-"))
    print()
    print("micro vs ddtrace: this %.2fx, other %.2fx" % (cpu["this"] / cpu["ddtrace"],
                                                         cpu["other"] / cpu["ddtrace"]))


if __name__ == "__main__":
    main(sys.argv[1])
