"""Tables of exporter_ab.sh runs: per round, ratios against the none run of the same round."""
import json, statistics, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(dict)
for d in rows:
    by[d["run"]["round"]][d["variant"]] = d["run"]
vs = [v for v in ("thread", "process", "pause") if any(v in x for x in by.values())]
agg = collections.defaultdict(list)
print("| round | none median / p99 us | " + " | ".join(f"{v}: median, p99 vs none" for v in vs) + " | request-thread CPU us/req none / " + " / ".join(vs) + " | app CPU us/req none / " + " / ".join(vs) + " | exporter child CPU us/req " + " / ".join(v for v in vs if v != "thread") + " | load1 |")
print("|---|---|" + "---|" * len(vs) + "---|---|---|---|")
for r in sorted(by):
    x = by[r]
    if not all(v in x for v in ("none", *vs)): continue
    n = x["none"]["items"]
    cells = []
    for v in vs:
        it = x[v]["items"]
        m, p = it["median_us"] / n["median_us"], it["p99_us"] / n["p99_us"]
        agg[v + " median"].append(m); agg[v + " p99"].append(p)
        if "p10_us" in it:  # runs before 2026-12-02 have no low quantiles
            agg[v + " p10"].append(it["p10_us"] / n["p10_us"])
            agg[v + " p25"].append(it["p25_us"] / n["p25_us"])
        agg[v + " app cpu"].append(it["cpu_us_per_req"] / n["cpu_us_per_req"])
        agg[v + " req-thread cpu - none (us)"].append(it["thread_cpu_us_per_req"] - n["thread_cpu_us_per_req"])
        if it["child_cpu_us_per_req"] is not None:
            agg[v + " child cpu (us)"].append(it["child_cpu_us_per_req"])
            agg[v + " all cpu (app+child)"].append((it["cpu_us_per_req"] + it["child_cpu_us_per_req"]) / n["cpu_us_per_req"])
        else:
            agg[v + " worker cpu (us)"].append(it["cpu_us_per_req"] - it["thread_cpu_us_per_req"])
        delivered = x[v]["sink"]["decoded"].get("elastic", {}).get("transaction", 0)
        agg[v + " delivered"].append(delivered == x[v]["expected_transactions"])
        cells.append("%.3fx, %.2fx" % (m, p))
    print("| %d | %.0f / %.0f | %s | %s | %s | %s | %.1f |" % (
        r, n["median_us"], n["p99_us"], " | ".join(cells),
        " / ".join("%.0f" % x[v]["items"]["thread_cpu_us_per_req"] for v in ("none", *vs)),
        " / ".join("%.0f" % x[v]["items"]["cpu_us_per_req"] for v in ("none", *vs)),
        " / ".join("%.0f" % x[v]["items"]["child_cpu_us_per_req"] for v in vs if v != "thread"),
        x["none"]["loadavg_start"][0]))
print()
for k, v in agg.items():
    if k.endswith("delivered"):
        print("%-36s %d/%d runs delivered every transaction" % (k, sum(v), len(v))); continue
    print("median %-32s %8.3f  (range %.3f .. %.3f, %d rounds)" % (k, statistics.median(v), min(v), max(v), len(v)))
