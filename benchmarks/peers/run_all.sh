#!/usr/bin/env bash
# The benchmark of record: every agent on the Flask app, its FastAPI twin and its Django twin,
# interleaved rounds with a no-agent A/A control, then memory during an outage, the manual-API
# micro loop, startup, and one summary (summarize.py).
#   bash run_all.sh                  # full: N=3000, ROUNDS=3 (see ../README.md for its duration)
#   QUICK=1 bash run_all.sh          # a check that everything runs: N=300, ROUNDS=1
#
# Each round, for each app (flask, fastapi, django): `none` (slot a), every agent (the order
# rotated by one each round), `none` again (slot b), so that the two no-agent runs bracket the
# agents; the summary takes each agent's ratio against the mean of the round's two, and shows
# how far the two differ from each other (the machine's own noise). Then per round: K x /items
# with the agent's destination refusing connections (Flask; peak RSS; rounds 1..OUTAGE_ROUNDS
# only), and micro.py.
# After the rounds: startup.py (it interleaves its own repetitions).
#
# Env: PY (venv python), N, ROUNDS, APPS, AGENTS, OUT (jsonl path), K (outage requests, 0 skips),
#      OUTAGE_ROUNDS (the outage part in rounds 1..this only; default 1: RSS needs no repeats,
#      and it is a third of a round), MICRO_ITERS (0 skips), STARTUP_REPS (0 skips), WARMUP,
#      ERRORS, OUTBOUND, QUICK, FIRST_ROUND (default 1; above 1 the run goes on from that
#      round, appending to an existing OUT: a run of record stopped between rounds)
set -uo pipefail
cd "$(dirname "$0")"
PY=${PY:-../../.tox/bench/bin/python}
# Bytecode written for a source tree too (beatlib on PYTHONPATH or installed editable), as an
# installed package has it: otherwise every run compiles beatlib's modules again.
unset PYTHONDONTWRITEBYTECODE
if [ "${QUICK:-0}" = 1 ]; then
  N=${N:-300}; ROUNDS=${ROUNDS:-1}; K=${K:-1000}; MICRO_ITERS=${MICRO_ITERS:-2000}
  STARTUP_REPS=${STARTUP_REPS:-5}; ERRORS=${ERRORS:-100}; OUTBOUND=${OUTBOUND:-50}
fi
N=${N:-3000}
ROUNDS=${ROUNDS:-3}
FIRST_ROUND=${FIRST_ROUND:-1}
OUTAGE_ROUNDS=${OUTAGE_ROUNDS:-1}
APPS=${APPS:-"flask fastapi django"}
AGENTS=${AGENTS:-"beatlib elasticapm sentry ddtrace otel"}
K=${K:-10000}
MICRO_ITERS=${MICRO_ITERS:-10000}
STARTUP_REPS=${STARTUP_REPS:-20}
WARMUP=${WARMUP:-300}
ERRORS=${ERRORS:-500}
OUTBOUND=${OUTBOUND:-200}
mkdir -p results
OUT=${OUT:-results/run_all_$(date +%Y%m%d_%H%M%S).jsonl}
ERR=${OUT%.jsonl}.stderr.log
echo "writing $OUT (stderr of runs: $ERR)" >&2
if [ "$FIRST_ROUND" -gt 1 ]; then
  [ -s "$OUT" ] || { echo "FIRST_ROUND=$FIRST_ROUND needs the run's OUT to go on from" >&2; exit 2; }
else
  : > "$OUT"
  : > "$ERR"
  echo "{\"kind\": \"params\", \"n\": $N, \"rounds\": $ROUNDS, \"k\": $K, \"micro_iters\": $MICRO_ITERS, \"startup_reps\": $STARTUP_REPS, \"warmup\": $WARMUP, \"errors\": $ERRORS, \"outbound\": $OUTBOUND, \"started\": \"$(date -u +%FT%TZ)\", \"nproc\": $(nproc), \"outage_rounds\": $OUTAGE_ROUNDS}" >> "$OUT"
fi

one() {  # round app agent slot [extra args...]
  local r=$1 app=$2 a=$3 slot=$4 ts line
  shift 4
  ts=$(date +%s)
  echo "=== round $r app $app agent $a $slot $* ===" >> "$ERR"
  if [ "$app" = fastapi ]; then
    set -- run_one_asgi.py "$a" "$N" "$@"
  else
    set -- run_one.py "$a" "$N" --app "$app" "$@"
  fi
  if line=$("$PY" "$@" --round "$r" --slot "$slot" 2>> "$ERR") && [ -n "$line" ]; then
    echo "$line" >> "$OUT"
    echo "round $r $app $a $slot: $(( $(date +%s) - ts ))s" >&2
  else
    echo "{\"agent\": \"$a\", \"app\": \"$app\", \"round\": $r, \"slot\": \"$slot\", \"failed\": true}" >> "$OUT"
    echo "round $r $app $a $slot: FAILED (see $ERR)" >&2
  fi
}

t0=$(date +%s)
read -r -a agents <<< "$AGENTS"
for r in $(seq "$FIRST_ROUND" "$ROUNDS"); do
  k=$(( (r - 1) % ${#agents[@]} ))
  order=("${agents[@]:k}" "${agents[@]:0:k}")
  for app in $APPS; do
    one "$r" "$app" none a --warmup "$WARMUP" --errors "$ERRORS" --outbound "$OUTBOUND"
    for a in "${order[@]}"; do
      one "$r" "$app" "$a" "" --warmup "$WARMUP" --errors "$ERRORS" --outbound "$OUTBOUND"
    done
    one "$r" "$app" none b --warmup "$WARMUP" --errors "$ERRORS" --outbound "$OUTBOUND"
  done
  if [ "$K" -gt 0 ] && [ "$r" -le "$OUTAGE_ROUNDS" ]; then
    for a in none "${order[@]}"; do
      N=$K one "$r" flask "$a" outage --outage --warmup "$WARMUP"
    done
  fi
  if [ "$MICRO_ITERS" -gt 0 ]; then
    echo "=== round $r micro ===" >> "$ERR"
    "$PY" micro.py none "${order[@]}" --iters "$MICRO_ITERS" --warm 500 --round "$r" \
      --out "$OUT" > /dev/null 2>> "$ERR" || echo "round $r micro: FAILED (see $ERR)" >&2
    echo "round $r micro done" >&2
  fi
done
if [ "$STARTUP_REPS" -gt 0 ]; then
  echo "=== startup ===" >> "$ERR"
  "$PY" startup.py "${agents[@]}" --reps "$STARTUP_REPS" --out "$OUT" > /dev/null 2>> "$ERR" \
    || echo "startup: FAILED (see $ERR)" >&2
  echo "startup done" >&2
fi
echo "total $(( $(date +%s) - t0 ))s" >&2
"$PY" summarize.py "$OUT" | tee "${OUT%.jsonl}.md"
