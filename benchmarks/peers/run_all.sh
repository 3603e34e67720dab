#!/usr/bin/env bash
# Interleaved overhead benchmark of Python APM agents on a realistic Flask app.
#   bash run_all.sh                      # 3 rounds x 5 agents, N=3000
#   N=1000 ROUNDS=1 bash run_all.sh      # quick check
#   RUNNER=run_one_asgi.py bash run_all.sh   # the FastAPI twin under uvicorn
# Env: PY (venv python), N, ROUNDS, AGENTS (space separated), OUT (jsonl path), RUNNER
set -uo pipefail
cd "$(dirname "$0")"
PY=${PY:-../../.tox/bench/bin/python}
N=${N:-3000}
ROUNDS=${ROUNDS:-3}
AGENTS=${AGENTS:-"none beatlib elasticapm sentry ddtrace otel"}
RUNNER=${RUNNER:-run_one.py}
mkdir -p results
OUT=${OUT:-results/run_all_$(date +%Y%m%d_%H%M%S).jsonl}
ERR=${OUT%.jsonl}.stderr.log
: > "$OUT"
: > "$ERR"
echo "writing $OUT (stderr of runs: $ERR)" >&2
t0=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
  for a in $AGENTS; do
    ts=$(date +%s)
    echo "=== round $r agent $a ===" >> "$ERR"
    if ! "$PY" "$RUNNER" "$a" "$N" --round "$r" >> "$OUT" 2>> "$ERR"; then
      echo "{\"agent\": \"$a\", \"round\": $r, \"failed\": true}" >> "$OUT"
      echo "round $r $a: FAILED (see $ERR)" >&2
    else
      echo "round $r $a: $(( $(date +%s) - ts ))s $(tail -n1 "$OUT" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("items median %.0fus" % d["items"]["median_us"])')" >&2
    fi
  done
done
echo "total $(( $(date +%s) - t0 ))s" >&2
"$PY" summarize.py "$OUT" | tee "${OUT%.jsonl}.md"
