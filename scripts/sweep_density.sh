#!/usr/bin/env bash
# A SpaRTA density sweep: one `sparta train` per density and seed, each in its own output_dir.
#
#   scripts/sweep_density.sh [--baselines] [--launcher CMD] [--full-lr LR] RECIPE "0.001 0.005 0.01 0.05" ["1 2 3"] [-- key=value ...]
#
# SEEDS defaults to the recipe's seed. Overrides after `--` apply to every run. Each run writes to
# the recipe's output_dir (by default runs/<task>/<method>-d<density>-s<seed>), its console output to
# <output_dir>.log. Rerunning the same command skips finished runs (all_results.json present) and
# resumes unfinished ones (`sparta train --resume`: from the newest checkpoint, else from the start);
# a folder holding a run of a different recipe is reported as failed, never touched.
# A failing run is logged and the sweep goes on; the exit code is 1 if any run failed, listed at the end.
#   --baselines    also LoRA (r=8 on q,v, the recipe's lr) and full fine-tuning (lr --full-lr, default 2e-5)
#   --launcher     or $LAUNCHER, e.g. "accelerate launch --num_processes 2": runs `$LAUNCHER -m sparta_cli train ...`
# Python: $PYTHON if set, else this checkout's .venv (no need to activate it), else python3 with sparta.
# Then: sparta report runs/<task> --output reports/<task>
set -uo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

source "$(dirname "$0")/find_python.sh"
launcher=${LAUNCHER:-}
plan_flags=()
positional=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --baselines) plan_flags+=(--baselines); shift ;;
    --full-lr) [[ $# -ge 2 ]] || usage; plan_flags+=(--full-lr "$2"); shift 2 ;;
    --launcher) [[ $# -ge 2 ]] || usage; launcher=$2; shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
[[ ${#positional[@]} -ge 2 && ${#positional[@]} -le 3 ]] || usage

if [[ -n "$launcher" ]]; then
  read -r -a train_cmd <<<"$launcher"
  train_cmd[0]=$(venv_tool "${train_cmd[0]}")  # `accelerate launch ...` from the same environment
  train_cmd+=(-m sparta_cli train)
else
  train_cmd=("$PYTHON" -m sparta_cli train)
fi

# Resolve every run first (same recipe loader as `sparta train`): typos and colliding folders fail here.
plan=$("$PYTHON" -m sparta_cli.sweep "${positional[@]}" "${plan_flags[@]}" -- "$@") || exit 2

done_runs=() skipped=() failed=()
while IFS=$'\t' read -r -a fields; do
  out=${fields[0]} action=${fields[1]}
  run_args=("${fields[@]:2}")
  mode=()
  case "$action" in
    finished) skipped+=("$out"); echo "skip   $out (finished)"; continue ;;
    conflict:*) failed+=("$out (${action#conflict:})"); echo "FAILED ${action#conflict:}" >&2; continue ;;
    resume) mode=(--resume) ;;
  esac
  log="$out.log"
  mkdir -p "$(dirname "$out")"
  echo "train  $out ${mode[*]}  (log: $log)"
  echo "### $(date -u +%FT%TZ) ${train_cmd[*]} ${positional[0]} ${run_args[*]} ${mode[*]}" >>"$log"
  "${train_cmd[@]}" "${positional[0]}" "${run_args[@]}" "${mode[@]}" </dev/null >>"$log" 2>&1
  rc=$?
  if [[ $rc -eq 0 ]]; then
    done_runs+=("$out")
  elif [[ $rc -eq 130 ]]; then
    echo "interrupted during $out: rerun the same command to resume the sweep" >&2; exit 130
  else
    failed+=("$out (exit $rc, log: $log: $(tail -n 1 "$log"))")
    echo "FAILED $out (exit $rc): $(tail -n 1 "$log")" >&2
  fi
done <<<"$plan"

echo "sweep: ${#done_runs[@]} trained, ${#skipped[@]} already finished, ${#failed[@]} failed"
if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
