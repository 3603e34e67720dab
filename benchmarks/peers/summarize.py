#!/usr/bin/env python3
"""The summary of a run_all.sh run: one table of record per agent, then the detail.

    python summarize.py results/run_all_XXXX.jsonl

Ratios: each run against the mean of its round's two no-agent runs of the same app (slot a
before the agents, slot b after them); the A/A control is none b / none a of each round.
Figures are medians across rounds; "spread" is max |round value - median| across rounds.
Older files (one none run per round, no app field) are read as Flask with that run as the base.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

ORDER = ["none", "beatlib", "elasticapm", "sentry", "ddtrace", "otel"]
APPS = ["flask", "fastapi", "django"]
TARGETS = {"flask": 1.05, "fastapi": 1.05, "django": 1.05, "p99": 1.2, "cpu": 1.15,
           "micro": 0.4, "spread": 0.03}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = statistics.median(xs)
    return max(abs(x - m) for x in xs)


def fmt(x, nd=0, suffix=""):
    if x is None:
        return "-"
    return ("{:,.%df}" % nd).format(x) + suffix


def ratio_pm(vals):
    """'1.07x ±0.02' (median, spread) of a list of ratios."""
    m, s = med(vals), spread(vals)
    if m is None:
        return "-"
    return "%.2fx" % m + (" ±%.2f" % s if s is not None else "")


def shipped(rec):
    """(transactions, child spans, errors, composite members) as decoded by the sink."""
    d = rec.get("sink", {}).get("decoded", {})
    if "elastic" in d:
        e = d["elastic"]
        return e.get("transaction", 0), e.get("span", 0), e.get("error", 0), e.get("span.composite_members", 0)
    if "sentry" in d:
        s = d["sentry"]
        return s.get("item.transaction", 0), s.get("spans", 0), s.get("item.event", 0), 0
    if "datadog" in d:
        x = d["datadog"]
        return x.get("root_spans", x.get("traces", 0)), x.get("spans", 0) - x.get("root_spans", 0), 0, 0
    if "otlp" in d:
        x = d["otlp"]
        return x.get("root_spans", 0), x.get("spans", 0) - x.get("root_spans", 0), 0, 0
    return 0, 0, 0, 0


class Run:
    """The app runs of one file, indexed by app, round, agent."""

    def __init__(self, recs):
        self.app_runs = [r for r in recs if "items" in r and not r.get("failed")]
        self.failed = [r for r in recs if r.get("failed")]
        self.outage = [r for r in recs if r.get("outage") and not r.get("failed")]
        self.micro = [r for r in recs if r.get("kind") == "micro"]
        self.startup = [r for r in recs if r.get("kind") == "startup"]
        self.params = next((r for r in recs if r.get("kind") == "params"), {})
        self.rounds = defaultdict(lambda: defaultdict(list))  # (app, round) -> agent -> runs
        for r in self.app_runs:
            self.rounds[(r.get("app", "flask"), r["round"])][r["agent"]].append(r)
        seen = {r["agent"] for r in self.app_runs} | {r["agent"] for r in self.outage}
        self.agents = [a for a in ORDER if a in seen] + sorted(seen - set(ORDER))
        self.apps = [a for a in APPS if any(k[0] == a for k in self.rounds)]

    def base(self, app, rnd, key):
        """The round's no-agent figure: mean of slots a and b (or the one there is)."""
        nones = self.rounds[(app, rnd)].get("none", [])
        vals = [key(r) for r in nones if key(r) is not None]
        return sum(vals) / len(vals) if vals else None

    def ratios(self, app, agent, key):
        """Per round: agent / the round's none (mean of its two)."""
        out = []
        for (a, rnd), runs in sorted(self.rounds.items()):
            if a != app or agent not in runs:
                continue
            b = self.base(app, rnd, key)
            vals = [key(r) for r in runs[agent]]
            if b and vals:
                out.append(statistics.mean(vals) / b)
        return out

    def aa(self, app, key):
        """Per round: none b / none a (the A/A control)."""
        out = []
        for (a, _), runs in sorted(self.rounds.items()):
            nones = {r.get("slot"): r for r in runs.get("none", [])}
            if a == app and "a" in nones and "b" in nones:
                out.append(key(nones["b"]) / key(nones["a"]))
        return out

    def runs(self, app, agent):
        return [r for (a, _), rs in sorted(self.rounds.items()) if a == app
                for r in rs.get(agent, [])]


def items_median(r):
    return r["items"]["median_us"]


def items_p99(r):
    return r["items"]["p99_us"]


def items_cpu(r):
    return r["items"]["cpu_us_per_req"]


def rss_items(r):
    return (r.get("memory") or {}).get("rss_items_kb")


def shipped_pct(run, app, agent):
    rs = run.runs(app, agent)
    vals = [100.0 * shipped(r)[0] / r["expected_transactions"] for r in rs if r.get("expected_transactions")]
    return med(vals)


def micro_figures(run):
    """agent -> (median CPU µs/txn all threads, per-round ratio to ddtrace list)."""
    by_round = defaultdict(dict)
    for r in run.micro:
        by_round[r.get("round", 0)][r["agent"]] = r
    cpu = defaultdict(list)
    vs_dd = defaultdict(list)
    for rs in by_round.values():
        dd = rs.get("ddtrace")
        for a, r in rs.items():
            cpu[a].append(r["cpu_us_per_txn"])
            if dd and a != "none":
                vs_dd[a].append(r["cpu_us_per_txn"] / dd["cpu_us_per_txn"])
    return cpu, vs_dd


def outage_figures(run):
    """agent -> [peak RSS growth during the outage, kB] and the none figure to subtract."""
    growth = defaultdict(list)
    for r in run.outage:
        m = r["memory"]
        growth[r["agent"]].append(m["rss_peak_kb"] - m["rss_before_kb"])
    peak = defaultdict(list)
    for r in run.outage:
        peak[r["agent"]].append(r["memory"]["rss_peak_kb"])
    return growth, peak


def record_table(run, out):
    cpu, vs_dd = micro_figures(run)
    growth, peak = outage_figures(run)
    st = run.startup[-1]["net"] if run.startup else {}
    none_peak = med(peak.get("none", []))
    heads = []
    for app in run.apps:
        heads.append("%s /items ratio ±spread" % app.capitalize().replace("Fastapi", "FastAPI"))
    others = [a for a in run.apps if a != "flask"]
    cols = heads + ["Flask p99 ratio", "Flask CPU/req ratio (all threads)"]
    if others:
        cols.append("CPU/req ratio " + " / ".join(others))
    cols += ["micro CPU µs/txn (ratio to ddtrace)", "shipped % (" + "/".join(run.apps) + ")",
             "startup ms wall / CPU (with app − app)", "steady RSS MB over none (Flask)",
             "outage peak RSS MB over none (Flask)"]
    out.append("| agent | " + " | ".join(cols) + " |")
    out.append("|---|" + "---:|" * len(cols))
    for agent in run.agents:
        cells = []
        for app in run.apps:
            if agent == "none":
                aa = run.aa(app, items_median)
                cells.append("A/A %s" % ratio_pm(aa) if aa else "1.00x")
            else:
                cells.append(ratio_pm(run.ratios(app, agent, items_median)))
        if agent == "none":
            aa99 = run.aa("flask", items_p99)
            aacpu = run.aa("flask", items_cpu)
            cells += ["A/A " + ratio_pm(aa99) if aa99 else "-", "A/A " + ratio_pm(aacpu) if aacpu else "-"]
        else:
            cells += [ratio_pm(run.ratios("flask", agent, items_p99)),
                      ratio_pm(run.ratios("flask", agent, items_cpu))]
        if others:
            if agent == "none":
                cells.append(" / ".join("A/A " + ratio_pm(run.aa(a, items_cpu)) for a in others))
            else:
                cells.append(" / ".join(ratio_pm(run.ratios(a, agent, items_cpu)) for a in others))
        c = med(cpu.get(agent, []))
        r = med(vs_dd.get(agent, []))
        cells.append("-" if c is None else "%.1f" % c + ("" if r is None else " (%.2fx)" % r))
        cells.append("-" if agent == "none" else "/".join(fmt(shipped_pct(run, app, agent), 1) for app in run.apps))
        s = st.get(agent + "+app")
        cells.append("-" if not s else "%.0f / %.0f" % (s["wall_ms"], s["cpu_ms"]))
        diffs = []
        for (a, rnd), rs in sorted(run.rounds.items()):
            if a == "flask" and agent in rs:
                b = run.base("flask", rnd, rss_items)
                v = [rss_items(x) for x in rs[agent] if rss_items(x) is not None]
                if b is not None and v:
                    diffs.append((statistics.mean(v) - b) / 1024)
        cells.append("-" if not diffs or agent == "none" else "%+.1f" % med(diffs))
        p = med(peak.get(agent, []))
        cells.append("-" if p is None or none_peak is None or agent == "none"
                     else "%+.1f (growth %.1f)" % ((p - none_peak) / 1024, med(growth[agent]) / 1024))
        out.append("| %s | %s |" % (agent, " | ".join(cells)))


def targets(run, out):
    """beatlib against the issue's targets, from the figures above."""
    if "beatlib" not in run.agents:
        return
    got = []

    def check(name, value, limit):
        if value is None:
            got.append("%s: -" % name)
        else:
            got.append("%s %.2f (target <= %.2f: %s)" % (name, value, limit, "met" if value <= limit else "NOT met"))

    for app in run.apps:
        check(app + " /items", med(run.ratios(app, "beatlib", items_median)), TARGETS[app])
        s = spread(run.ratios(app, "beatlib", items_median))
        if s is not None:
            check(app + " spread", s, TARGETS["spread"])
        peers = [med(run.ratios(app, a, items_median)) for a in run.agents if a not in ("none", "beatlib")]
        peers = [p for p in peers if p is not None]
        mine = med(run.ratios(app, "beatlib", items_median))
        if peers and mine is not None:
            got.append("%s ahead of every peer: %s" % (app, "yes" if mine < min(peers) else "NO"))
    check("flask p99", med(run.ratios("flask", "beatlib", items_p99)), TARGETS["p99"])
    check("flask CPU/req", med(run.ratios("flask", "beatlib", items_cpu)), TARGETS["cpu"])
    _, vs_dd = micro_figures(run)
    check("micro vs ddtrace", med(vs_dd.get("beatlib", [])), TARGETS["micro"])
    if run.startup:
        net = run.startup[-1]["net"]
        mine = net.get("beatlib+app", {}).get("cpu_ms")
        peers = {a: v["cpu_ms"] for a, v in net.items() if a.endswith("+app") and not a.startswith("beatlib")}
        if mine is not None and peers:
            light = min(peers, key=peers.get)
            got.append("startup CPU %.0f ms vs lightest peer %s %.0f ms: %s" % (
                mine, light[:-4], peers[light], "met" if mine <= peers[light] else "NOT met"))
    out.append("\nbeatlib against the issue's targets: " + "; ".join(got) + ".")


def per_round(run, app, out):
    rnds = sorted(r for a, r in run.rounds if a == app)
    out.append("\n#### %s: /items median µs per round, ratio to the round's none (mean of a and b)\n" % app)
    out.append("| agent | " + " | ".join("round %s" % r for r in rnds) + " | median ratio | spread |")
    out.append("|---|" + "---:|" * len(rnds) + "---:|---:|")
    for agent in run.agents:
        if agent == "none":
            for slot in ("a", "b"):
                vals = []
                for rnd in rnds:
                    rs = [r for r in run.rounds[(app, rnd)].get("none", []) if r.get("slot") == slot]
                    vals.append(fmt(items_median(rs[0])) if rs else "-")
                out.append("| none %s | %s | | |" % (slot, " | ".join(vals)))
            aa = run.aa(app, items_median)
            out.append("| A/A: none b / none a | %s | %s | %s |" % (
                " | ".join("%.3fx" % x for x in aa) if aa else " | ".join("-" for _ in rnds),
                "%.3fx" % med(aa) if aa else "-", fmt(spread(aa), 3)))
            continue
        cells = []
        for rnd in rnds:
            rs = run.rounds[(app, rnd)].get(agent, [])
            b = run.base(app, rnd, items_median)
            nones = {r.get("slot"): items_median(r) for r in run.rounds[(app, rnd)].get("none", [])}
            if rs and b:
                v = items_median(rs[0])
                rng = ""
                if "a" in nones and "b" in nones:
                    lo, hi = sorted((v / nones["a"], v / nones["b"]))
                    rng = " (%.2f..%.2f)" % (lo, hi)
                cells.append("%s: %.3fx%s" % (fmt(v), v / b, rng))
            else:
                cells.append("-")
        rat = run.ratios(app, agent, items_median)
        out.append("| %s | %s | %s | %s |" % (agent, " | ".join(cells), "%.3fx" % med(rat) if rat else "-",
                                               fmt(spread(rat), 3)))
    loads = []
    for rnd in rnds:
        ls = [r["loadavg_start"][0] for rs in run.rounds[(app, rnd)].values() for r in rs
              if r.get("loadavg_start")]
        loads.append("%.1f..%.1f" % (min(ls), max(ls)) if ls else "-")
    out.append("| 1-min load at the runs' start | %s | | |" % " | ".join(loads))


def detail(run, app, out):
    out.append("\n### %s /items (N=%s per run, %d round(s); medians across rounds; ratios to the round's none)\n"
               % (app, fmt(med(r["n"] for r in run.runs(app, "none"))),
                  len({r for a, r in run.rounds if a == app})))
    out.append("| agent | version | /items median µs | ratio | p99 µs | p99 ratio | CPU µs/req (all threads) "
               "| CPU ratio | /error median µs | /error overhead µs | /outbound median µs | RSS after /items MB "
               "| sink requests | sink bytes | shipped txns % | child spans / txn | errors shipped | flush s |")
    out.append("|---|---|" + "---:|" * 16)
    for agent in run.agents:
        rs = run.runs(app, agent)
        if not rs:
            continue
        err_ovh = []
        for (a, rnd), rr in run.rounds.items():
            if a == app and agent in rr:
                b = run.base(app, rnd, lambda r: r["error"]["median_us"])
                if b is not None:
                    err_ovh.append(rr[agent][0]["error"]["median_us"] - b)
        sh = [shipped(r) for r in rs]
        tx, sp, er = med(s[0] for s in sh), med(s[1] for s in sh), med(s[2] for s in sh)
        none = agent == "none"
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            agent, rs[0].get("version", "-"), fmt(med(items_median(r) for r in rs)),
            "-" if none else ratio_pm(run.ratios(app, agent, items_median)),
            fmt(med(items_p99(r) for r in rs)), "-" if none else ratio_pm(run.ratios(app, agent, items_p99)),
            fmt(med(items_cpu(r) for r in rs)), "-" if none else ratio_pm(run.ratios(app, agent, items_cpu)),
            fmt(med(r["error"]["median_us"] for r in rs)), "0" if none else fmt(med(err_ovh)),
            fmt(med((r.get("outbound") or {}).get("median_us") for r in rs)),
            fmt(med(rss_items(r) for r in rs) and med(rss_items(r) for r in rs) / 1024, 1),
            fmt(med(r["sink_requests"] for r in rs)), fmt(med(r["sink_bytes"] for r in rs)),
            "-" if none else fmt(shipped_pct(run, app, agent), 1),
            "-" if none or not tx else fmt(sp / tx, 1), "-" if none else fmt(er),
            fmt(med(r.get("flush_s") for r in rs), 2)))
    notes = []
    for agent in run.agents:
        rs = run.runs(app, agent)
        if not rs:
            continue
        dec = rs[-1].get("sink", {}).get("decoded", {})
        if "sentry" in dec and dec["sentry"].get("discarded"):
            notes.append("sentry: client_report discarded (last round) " + ", ".join(
                "%s=%s" % kv for kv in sorted(dec["sentry"]["discarded"].items())))
        if "elastic" in dec and dec["elastic"].get("span.composite_members") and agent == "elasticapm":
            comp = sum(v for k, v in dec["elastic"].get("span_names", {}).items() if " x" in k)
            notes.append("elasticapm: span compression, %d composite spans stand for %d DB queries (last round)"
                         % (comp, dec["elastic"]["span.composite_members"]))
        n = rs[-1].get("notes", {})
        if n.get("instrumented") or n.get("patched"):
            notes.append("%s: %s" % (agent, n.get("instrumented") or n.get("patched")))
    if notes:
        out.append("\n" + "\n".join("- " + x for x in notes))
    per_round(run, app, out)


def memory_detail(run, out):
    if not run.outage:
        return
    k = med(r["n"] for r in run.outage)
    out.append("\n### Memory during an outage (Flask, the agent's destination refusing connections, "
               "%s x /items after the warm-up; medians across rounds)\n" % fmt(k))
    out.append("| agent | RSS after warm-up MB | peak RSS MB | peak over none MB | growth during the outage MB "
               "| RSS at the end MB | s |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    growth, peak = outage_figures(run)
    none_peak = med(peak.get("none", []))
    for agent in run.agents:
        rs = [r for r in run.outage if r["agent"] == agent]
        if not rs:
            continue
        m = [r["memory"] for r in rs]
        p = med(peak[agent])
        out.append("| %s | %.1f | %.1f | %s | %.1f | %.1f | %.0f |" % (
            agent, med(x["rss_before_kb"] for x in m) / 1024, p / 1024,
            "-" if agent == "none" or none_peak is None else "%+.1f" % ((p - none_peak) / 1024),
            med(growth[agent]) / 1024, med(x["rss_end_kb"] for x in m) / 1024, med(x["s"] for x in m)))


def micro_detail(run, out):
    if not run.micro:
        return
    cpu, vs_dd = micro_figures(run)
    out.append("\n### Manual API: 1 transaction + 10 child spans (micro.py, %s iterations; medians across rounds)\n"
               % fmt(med(r["iters"] for r in run.micro)))
    out.append("| agent | µs / txn (wall) | CPU µs / txn (all threads) | ratio to ddtrace ±spread "
               "| worker CPU µs / txn | txns shipped % |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for agent in run.agents:
        rs = [r for r in run.micro if r["agent"] == agent]
        if not rs:
            continue
        sh = []
        for r in rs:
            d = r.get("sink_decoded") or {}
            t = (d.get("elastic", {}).get("transaction") or d.get("sentry", {}).get("item.transaction")
                 or d.get("datadog", {}).get("root_spans") or d.get("otlp", {}).get("root_spans") or 0)
            sh.append(100.0 * t / r["expected_transactions"])
        out.append("| %s | %.1f | %.1f | %s | %.1f | %s |" % (
            agent, med(r["us_per_txn"] for r in rs), med(cpu[agent]),
            "-" if agent in ("none", "ddtrace") else ratio_pm(vs_dd[agent]),
            med(r["worker_cpu_us_per_txn"] for r in rs), "-" if agent == "none" else fmt(med(sh), 1)))


def startup_detail(run, out):
    if not run.startup:
        return
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from startup import table

    out.append("\n" + table(run.startup[-1]))


def main(path):
    recs = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    run = Run(recs)
    out = []
    loads = [r.get("loadavg_start", [None])[0] for r in recs if r.get("loadavg_start")]
    p = run.params
    out.append("## Benchmark of record (%s)\n" % path.rsplit("/", 1)[-1])
    if p:
        out.append("N=%s /items per run, %s round(s), apps %s; outage K=%s; micro %s iterations; startup %s reps; "
                   "started %s on %s cores." % (p.get("n"), p.get("rounds"), ", ".join(run.apps), p.get("k"),
                                                 p.get("micro_iters"), p.get("startup_reps"), p.get("started"),
                                                 p.get("nproc")))
    if loads:
        out.append("1-min load average at the start of each run: min %.2f, median %.2f, max %.2f (2 cores: "
                   "above ~1 someone else is using the machine)." % (min(loads), med(loads), max(loads)))
    out.append("\nRatios are against the mean of the round's two no-agent runs (slots a and b) of the same app; "
               "±spread is max |round ratio - median ratio| across rounds. The none row shows the A/A control: "
               "none b / none a per round, its median and spread; an agent's ratio cannot be read finer than that.\n")
    record_table(run, out)
    targets(run, out)
    for app in run.apps:
        detail(run, app, out)
    memory_detail(run, out)
    micro_detail(run, out)
    startup_detail(run, out)
    if run.failed:
        out.append("\nFAILED runs: " + ", ".join("%s/%s/round %s" % (f.get("app", "flask"), f["agent"], f["round"])
                                                 for f in run.failed))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
