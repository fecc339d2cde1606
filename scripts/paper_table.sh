#!/usr/bin/env bash
# Issue 13's table in one command (see scripts/paper_table.py for the protocol and options):
#   SPARTA_DATA_DIR=/path/to/data scripts/paper_table.sh OUT [--tasks rte mrpc ...] [--jobs 2] [--smollm] [--mmlu] [-- key=value ...]
# Rerun the same command to continue: finished runs are skipped, unfinished ones resumed.
set -euo pipefail
source "$(dirname "$0")/find_python.sh"
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$PYTHON" "$repo/scripts/paper_table.py" "$@"
