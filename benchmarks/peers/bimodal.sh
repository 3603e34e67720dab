#!/usr/bin/env bash
# Interleaved none/beatlib rounds of run_one.py under bimodal_probe.py (per-thread CPU, run-queue
# wait, switches, cores, the worker's drains), then the per-round table.
#   PY=<bench venv python> N=2000 ROUNDS=10 bash bimodal.sh
# Env: PY, N (2000), ROUNDS (10), AGENTS ("none beatlib"), OUT (results/bimodal_<time>.jsonl)
set -uo pipefail
cd "$(dirname "$0")"
PY=${PY:-../../.tox/bench/bin/python}
N=${N:-2000}
ROUNDS=${ROUNDS:-10}
AGENTS=${AGENTS:-"none beatlib"}
OUT=${OUT:-results/bimodal_$(date +%Y%m%d_%H%M%S).jsonl}
: > "$OUT"
: > "${OUT%.jsonl}.stderr.log"
for r in $(seq 1 "$ROUNDS"); do
  for a in $AGENTS; do
    "$PY" bimodal_probe.py "$a" "$N" --round "$r" >> "$OUT" 2>> "${OUT%.jsonl}.stderr.log" \
      || echo "{\"agent\": \"$a\", \"round\": $r, \"failed\": true}" >> "$OUT"
    echo "round $r $a done (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  done
done
"$PY" bimodal_summary.py "$OUT" | tee "${OUT%.jsonl}.table.md"
