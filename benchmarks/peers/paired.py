#!/usr/bin/env python3
"""The agents side by side in one window of time: every member (an agent, or none) is its
own `run_one.py --paired` process, set up and warmed up one after the other, then they take
turns: each runs a slice of M x /items while the others wait, in a new (seeded random) order
every cycle, for C cycles. A member's ratio is the median, over the cycles, of its slice's
median /items time against the `none` member's slice of the same cycle: every member saw the
same stretch of the machine's time, and each ratio compares slices a few seconds apart at
most.

    python paired.py [--app flask|django|fastapi] [--members none,none,beatlib,...] [--cycles 120]
                     [--slice 25] [--warmup 300] [--blocks 6] [--seed 1] [--aslr]
                     [--out results/paired.jsonl]

Why: this machine's speed flips between two modes, 1.75x apart, every half second to few
seconds, driven from outside the VM (`machine_speed.py`, results/noise_20261202.md); a run of
its own per agent (run_all.sh) catches a different mix of the two each time, so its ratios
swing by more than the overheads being measured. Interleaved slices catch the same mix.
The members run without address randomisation (`setarch -R`) and with one hash seed: with
it, one process's layout alone moved its speed by about 5% for a whole run.

A member named twice (`none,none`) is run twice: the second is the A/A control. A member
`beatlib:process` is beatlib with exporter_process=True; `beatlib:wake16` wakes beatlib's
worker once 16 events wait (run_one.wake_at); `beatlib@../other/src` is
beatlib from another checkout (PYTHONPATH), to set two versions side by side. After each slice a member waits
until its agent's background threads (and helper process) are idle, so what its slice gave
them is done before the next slice. Shown: the share of background CPU outside the member's
slices (the turn-taking moved it off its own requests) and of it, the share that ran beside
other members' slices (timer-driven flushes and exports). Each member is busy a fraction
of the time: this measures the request path of an app that is not saturated; run_all.sh
measures the saturated one.

Prints a table; writes each member's figures (with run_one's final line) and each slice's
median as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

import summarize
from run_one import pct

HERE = os.path.dirname(os.path.abspath(__file__))


def start(member: str, args: argparse.Namespace, py: str) -> subprocess.Popen:
    member, _, src = member.partition("@")
    agent, _, variant = member.partition(":")
    env = dict(os.environ)
    if src:  # this member's agent from another checkout: two versions side by side
        env["PYTHONPATH"] = os.path.abspath(src)
    # One hash seed for all: a member's dicts and sets then lay out as every other's.
    env.setdefault("PYTHONHASHSEED", "0")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode for a source tree too (run_all.sh)
    if variant.startswith("wake"):  # the worker's wake-up threshold (run_one.wake_at)
        env["PEERBENCH_BEATLIB_WAKE"] = variant[4:]
    if variant == "process":
        env["PEERBENCH_BEATLIB_EXPORTER"] = "process"
    if args.app == "fastapi":  # uvicorn in a process of its own, driven over loopback
        command = [py, os.path.join(HERE, "run_one_asgi.py"), agent, "0"]
    else:
        command = [py, os.path.join(HERE, "run_one.py"), agent, "0", "--app", args.app]
    command += ["--paired", "--warmup", str(args.warmup)]
    if not args.aslr and shutil.which("setarch"):
        command = ["setarch", "-R", *command]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=args.stderr, text=True, env=env, cwd=HERE)
    if read_line(proc) != "ready":
        raise RuntimeError(f"{member} did not start (see the stderr log)")
    return proc


def read_line(proc: subprocess.Popen) -> str:
    """The member's next line of ours (anything an agent prints itself is skipped)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("member exited early (see the stderr log)")
        line = line.strip()
        if line == "ready" or line.startswith("{"):
            return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--app", choices=("flask", "django", "fastapi"), default="flask")
    ap.add_argument("--members", default="none,none,beatlib,beatlib:process")
    ap.add_argument("--cycles", type=int, default=120)
    ap.add_argument("--slice", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=6, help="the cycles cut in this many blocks, "
                    "for the spread of each ratio")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=1, help="of the members' order in each cycle")
    ap.add_argument("--py", default=sys.executable)
    ap.add_argument("--aslr", action="store_true", help="members with address space "
                    "randomisation (by default without, by setarch -R: each process's layout "
                    "then moves its speed by about ±5%% of its own, results/noise_20261202.md)")
    args = ap.parse_args()
    args.blocks = max(1, min(args.blocks, args.cycles))
    members = args.members.split(",")
    if members[0] != "none":
        ap.error("the first member is the base: none")
    labels = [m if members[:i].count(m) == 0 else f"{m}#{members[:i].count(m) + 1}"
              for i, m in enumerate(members)]
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out = args.out or os.path.join(HERE, "results", f"paired_{args.app}_{stamp}.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args.stderr = open(out[:-len(".jsonl")] + ".stderr.log", "w")
    t0 = time.time()
    load0 = os.getloadavg()
    procs = {label: start(member, args, args.py)
             for label, member in zip(labels, members, strict=True)}
    slices: dict[str, list[dict]] = {label: [] for label in labels}
    # A new order each cycle (seeded: runs repeat it): every member follows every other
    # equally often; a rotation would put each after the same one every time, and what a
    # member leaves behind (its caches, its agent's late work) would always fall on that one.
    shuffle = random.Random(args.seed).shuffle
    for _ in range(args.cycles):
        order = list(labels)
        shuffle(order)
        for label in order:
            proc = procs[label]
            proc.stdin.write(f"slice {args.slice}\n")
            proc.stdin.flush()
            answer = json.loads(read_line(proc))
            answer["ended"] = time.time() - t0
            slices[label].append(answer)
    finals = {}
    for label, proc in procs.items():
        proc.stdin.write("end\n")
        proc.stdin.flush()
        finals[label] = json.loads(read_line(proc))
        proc.wait(300)
    elapsed = time.time() - t0

    def durations(label: str, lo: int = 0, hi: int | None = None) -> list[float]:
        return [d for s in slices[label][lo:hi] for d in s["durs_us"]]

    def cycle_ratios(label: str, lo: int = 0, hi: int | None = None) -> list[float]:
        # Each cycle's slice median against the none member's of the same cycle: slices
        # close in time, a ratio the machine's mode changes least.
        return [statistics.median(a["durs_us"]) / statistics.median(b["durs_us"])
                for a, b in zip(slices[label][lo:hi], slices["none"][lo:hi], strict=True)]

    base_p99 = pct(sorted(durations("none")), 0.99)
    per = max(1, args.cycles // args.blocks)
    blocks = [(b * per, (b + 1) * per) for b in range(args.blocks)]
    rows = []
    with open(out, "w") as f:
        f.write(json.dumps({"kind": "params", "app": args.app, "members": members,
                            "cycles": args.cycles, "slice": args.slice, "warmup": args.warmup,
                            "blocks": args.blocks, "started": time.strftime(
                                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                            "elapsed_s": round(elapsed, 1), "loadavg_start": load0,
                            "nproc": os.cpu_count()}) + "\n")
        for label in labels:
            d = durations(label)
            p99 = pct(sorted(d), 0.99)
            block_ratios = [statistics.median(cycle_ratios(label, lo, hi)) for lo, hi in blocks]
            s = slices[label]
            thread = sum(x["thread_us"] for x in s) / len(d)
            bg_slice = sum(x["bg_slice_us"] for x in s) / len(d)
            bg_after = sum(x["bg_after_us"] for x in s) / len(d)
            bg_between = sum(x["bg_between_us"] for x in s) / len(d)
            final = finals[label]
            shipped = summarize.shipped(final)[0]
            row = {"kind": "member", "label": label, "agent": final["agent"],
                   "version": final["version"], "n": len(d),
                   "median_us": statistics.median(d), "p99_us": p99,
                   "ratio": statistics.median(cycle_ratios(label)),
                   "pooled_ratio": statistics.median(d) / statistics.median(durations("none")),
                   "p99_ratio": p99 / base_p99,
                   "block_ratios": [round(r, 4) for r in block_ratios],
                   "thread_cpu_us_per_req": thread,
                   "bg_cpu_us_per_req": bg_slice + bg_after + bg_between,
                   "bg_outside_share": (bg_after + bg_between) / (bg_slice + bg_after + bg_between)
                   if bg_slice + bg_after + bg_between > 0 else 0,
                   "bg_between_share": bg_between / (bg_slice + bg_after + bg_between)
                   if bg_slice + bg_after + bg_between > 0 else 0,
                   "expected_transactions": final["expected_transactions"],
                   "shipped_transactions": shipped,
                   "memory": final["memory"], "bad_status": sum(x["bad"] for x in s),
                   "final": final}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
        for label in labels:  # each slice's median, when it ended: for a look at the noise
            f.write(json.dumps({"kind": "slices", "label": label, "ended": [
                round(x["ended"], 3) for x in slices[label]], "median_us": [
                statistics.median(x["durs_us"]) for x in slices[label]]}) + "\n")
    none_cpu = rows[0]["thread_cpu_us_per_req"] + rows[0]["bg_cpu_us_per_req"]
    print(f"{args.app}: {args.cycles} cycles x {args.slice} /items per member, "
          f"{elapsed:.0f} s, load {load0[0]:.1f}; {out}")
    print("| member | /items vs none | blocks (min-max) | pooled median | p99 vs none | "
          "CPU/req vs none | request thread CPU µs/req | background CPU µs/req (after the "
          "slices, beside others) | RSS over none | shipped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    none_rss = rows[0]["memory"]["rss_items_kb"]
    for r in rows:
        cpu = (r["thread_cpu_us_per_req"] + r["bg_cpu_us_per_req"]) / none_cpu
        shipped = ("-" if r["agent"] == "none" else
                   "%d/%d" % (r["shipped_transactions"] or 0, r["expected_transactions"]))
        rss = r["memory"]["rss_items_kb"] + (r["memory"].get("child_rss_items_kb") or 0)
        print("| %s | %.3fx | %.3f-%.3f | %.3fx | %.2fx | %.3fx | %.0f | %.0f (%s) | "
              "%+.1f MB | %s |" % (
                  r["label"], r["ratio"], min(r["block_ratios"]), max(r["block_ratios"]),
                  r["pooled_ratio"], r["p99_ratio"], cpu, r["thread_cpu_us_per_req"],
                  r["bg_cpu_us_per_req"], "%.0f%%, %.0f%%" % (
                      100 * r["bg_outside_share"], 100 * r["bg_between_share"])
                  if r["bg_cpu_us_per_req"] >= 5 else "-",
                  (rss - none_rss) / 1024, shipped))


if __name__ == "__main__":
    main()
