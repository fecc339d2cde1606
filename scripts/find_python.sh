# Sourced by the scripts in this folder: sets PYTHON to an interpreter that has sparta installed,
# so they work right after scripts/setup.sh without an activated virtualenv.
# Order: $PYTHON if the caller set it; this checkout's .venv/bin/python; python3 or python from
# PATH, only if sparta imports there. Also `venv_tool NAME`: NAME from PYTHON's bin folder when it
# is there (accelerate, torchrun), else from PATH.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  for _candidate in "$_repo/.venv/bin/python" python3 python; do
    if command -v "$_candidate" >/dev/null 2>&1 && "$_candidate" -c "import sparta_cli.cli" >/dev/null 2>&1; then
      PYTHON=$_candidate
      break
    fi
  done
  if [[ -z "${PYTHON:-}" ]]; then
    echo "error: no Python with sparta installed: run \`bash $_repo/scripts/setup.sh\` (it creates $_repo/.venv), or set PYTHON=/path/to/python" >&2
    exit 2
  fi
fi
unset _candidate

venv_tool() {
  local beside
  beside="$(dirname "$(command -v "$PYTHON")")/$1"
  if [[ -x "$beside" ]]; then echo "$beside"; else echo "$1"; fi
}
