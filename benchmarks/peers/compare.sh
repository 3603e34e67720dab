#!/usr/bin/env bash
# This checkout's beatlib side by side with another version of it (its src/ folder), no agent
# and ddtrace, interleaved in one run: the app benchmark (run_one.py) and the micro loop.
#   PY=<bench venv python> bash compare.sh /path/to/other/checkout/src
# Env: PY, N (3000), ROUNDS (3), OUT (results/compare_<time>)
set -uo pipefail
cd "$(dirname "$0")"
OTHER=${1:?"give the other version's src/ folder"}
PY=${PY:-../../.tox/bench/bin/python}
N=${N:-3000}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-results/compare_$(date +%Y%m%d_%H%M%S)}
: > "$OUT.jsonl"
: > "$OUT.stderr.log"
run() {  # variant agent pythonpath
  local line
  line=$(PYTHONPATH=$3 "$PY" run_one.py "$2" "$N" --round "$r" 2>>"$OUT.stderr.log") \
    || line='{"failed": true}'
  echo "{\"variant\": \"$1\", \"run\": $line}" >> "$OUT.jsonl"
  echo "round $r $1 done" >&2
}
micro() {  # variant agent pythonpath
  PYTHONPATH=$3 "$PY" micro.py "$2" --out "$OUT.micro_$1.jsonl" >/dev/null 2>>"$OUT.stderr.log"
  echo "micro round $r $1 done" >&2
}
for r in $(seq 1 "$ROUNDS"); do
  run none none ""; run this beatlib ""; run other beatlib "$OTHER"; run ddtrace ddtrace ""
done
for r in $(seq 1 "$ROUNDS"); do
  micro this beatlib ""; micro other beatlib "$OTHER"; micro ddtrace ddtrace ""
done
"$PY" summarize_compare.py "$OUT" | tee "$OUT.md"
