#!/usr/bin/env bash
# BENCHMARKS.md "sparta tune vs a grid": TPE with median pruning against a 5 x 4 grid of the same
# 20 trials, both on the recipe's held-out validation rows (default configs/tune_stsb.yaml), run side
# by side (one worker and one CPU thread each, so they share the machine alike). Resumable: rerun the
# same command after a kill; finished trials are never rerun. Then the table:
#   python scripts/bench_tune_table.py OUT/tpe OUT/grid
#   [RECIPE=my_tune.yaml] bash scripts/bench_tune.sh [OUT=tunes/bench] [-- key=value ...]
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/find_python.sh
recipe=${RECIPE:-configs/tune_stsb.yaml}
out=${1:-tunes/bench}
shift $(( $# > 0 ? 1 : 0 ))
[[ "${1:-}" == "--" ]] && shift
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PYTHON" -m sparta_cli tune "$recipe" "$@" --study tpe -o "$out/tpe" >>"$out/tpe.log" 2>&1 &
tpe=$!
# the grid spans the same box as TPE's ranges: densities 1e-3..0.2, rates around docs/learning_rates.md's rule
"$PYTHON" -m sparta_cli tune "$recipe" "$@" --study grid -o "$out/grid" --sampler grid --pruner none \
  --space "adapter.density=[0.001, 0.005, 0.02, 0.05, 0.2]" --space "training.lr=[3.0e-3, 1.0e-2, 3.0e-2, 1.0e-1]" \
  >>"$out/grid.log" 2>&1 &
grid=$!
status=0
wait $tpe || status=1
wait $grid || status=1
"$PYTHON" scripts/bench_tune_table.py "$out/tpe" "$out/grid"
exit $status
