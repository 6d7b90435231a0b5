#!/usr/bin/env bash
# The GPU benchmark in one command (issue 21): real InternVL2.5-1B / 8B shapes, random bf16 weights, one JSON file.
#
#   bash benchmarks/gpu.sh                      # writes benchmarks/gpu_results.json (at most 8 minutes)
#   OUT=/somewhere/results.json bash benchmarks/gpu.sh --repeats 3
#   bash benchmarks/gpu.sh --tiny --device cpu  # the CPU check of the same code paths (tests run this via Python)
#
# The GPU machine has no internet. The script first checks the installed versions (benchmarks/bench_gpu.py
# REQUIREMENTS: torch >= 2.4, transformers >= 5.18 < 6, peft, accelerate, ...). If all are met it runs with what is
# installed. If some are not, it installs them with pip from a folder of wheels carried next to it (WHEELS, default
# benchmarks/wheels/; --no-index: nothing is downloaded there) and stops with the list if that folder is missing.
# Build the folder beforehand on a machine with internet, for the GPU machine's Python version and platform, e.g.:
#
#   pip download -d benchmarks/wheels --only-binary=:all: --python-version 3.10 --platform manylinux2014_x86_64 \
#       "transformers>=5.18,<6" "peft>=0.21" "accelerate>=1.10" "tokenizers>=0.23.1" "safetensors>=0.8" \
#       "huggingface-hub>=1.31" pyyaml packaging
#
# (add a CUDA torch wheel only if the machine's torch is older than 2.4; add deepspeed / flash-attn wheels to
# measure those sections: without them the results file says they were skipped and why).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$HERE/wheels}"
OUT="${OUT:-$HERE/gpu_results.json}"
LIMIT_S="${LIMIT_S:-480}"

unmet="$("$PY" "$HERE/bench_gpu.py" --check-requirements)"
if [ -n "$unmet" ]; then
    echo "unmet requirements:" $unmet
    if [ ! -d "$WHEELS" ]; then
        echo "no wheel folder at $WHEELS: carry one (see the top of this script) or install these first" >&2
        exit 2
    fi
    # shellcheck disable=SC2086  # one requirement per word (they hold no spaces)
    "$PY" -m pip install --no-index --find-links "$WHEELS" $unmet
    unmet="$("$PY" "$HERE/bench_gpu.py" --check-requirements)"
    if [ -n "$unmet" ]; then
        echo "still unmet after installing from $WHEELS:" $unmet >&2
        exit 2
    fi
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
cd "$ROOT"
# The driver stops starting sections after --budget-s (default 420 s) and writes the file after each model size;
# timeout is the hard stop.
HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout "$LIMIT_S" \
    "$PY" "$HERE/bench_gpu.py" --out "$OUT" "$@"
echo "results: $OUT"
