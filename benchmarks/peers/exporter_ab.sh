#!/bin/bash
# Interleaved rounds of run_one.py: none, beatlib (worker thread), beatlib (exporter process);
# the order rotates each round. One JSON line per run, {"variant": ..., "run": ...}, in $OUT.
#   PY=/tmp/benchvenv/bin/python N=2000 ROUNDS=6 bash exporter_ab.sh
#   python exporter_summary.py results/exporter_process.jsonl
cd "$(dirname "$0")"
OUT=${OUT:-results/exporter_process.jsonl}
N=${N:-2000}
ROUNDS=${ROUNDS:-6}
export PYTHONPATH=${PYTHONPATH:-$PWD/../../src}
for r in $(seq 1 $ROUNDS); do
  variants=("none" "thread" "process")
  k=$(( (r - 1) % 3 ))
  for i in 0 1 2; do
    v=${variants[$(( (i + k) % 3 ))]}
    case $v in
      none) line=$(${PY:-python} run_one.py none $N --round $r 2>/dev/null) ;;
      thread) line=$(${PY:-python} run_one.py beatlib $N --round $r 2>/dev/null) ;;
      process) line=$(PEERBENCH_BEATLIB_EXPORTER=process ${PY:-python} run_one.py beatlib $N --round $r 2>/dev/null) ;;
    esac
    echo "{\"variant\": \"$v\", \"run\": $line}" >> $OUT
  done
done
