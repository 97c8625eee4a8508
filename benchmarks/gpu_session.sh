#!/usr/bin/env bash
# Every GPU measurement of docs/results/speed.md, and the CUDA-only tests, in one command: what a
# session that is lent a GPU runs in one call of the device tool (few full calls cost less device
# time than many small ones).
#
# Prepare on the development machine, in the repository root (once per session):
#
#   bash benchmarks/gpu_session.sh --prepare ../shared/data   # wheels to .whl/, gzipped MNIST to .devdata/
#
# (both folders are in .gitignore, so they travel only when carried);
#
# then run on the GPU machine with the device tool: carry [".whl", ".devdata"], command
# "bash benchmarks/gpu_session.sh". Results land in $OUT (the device tool brings them back; at
# most 8 files): machine.txt, pytest.log, step_time.json, step_time_tf32.json, epoch_time.json,
# nll_throughput.json, ais_throughput.json and errors.log. (AIS on the device is tested in tests/test_cuda.py.)
#
# PYRO_VAE_BENCH_DEVICE=cpu PYRO_VAE_GPU_SESSION_QUICK=1 runs the same sequence on a CPU, small,
# to check the script itself.
set -uo pipefail

if [ "${1:-}" = "--prepare" ]; then
    data=${2:?usage: gpu_session.sh --prepare DATA_DIR}
    # The GPU machine has torch and the rest; Pyro (pure Python) travels as wheels for its Python 3.12.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2 || exit 1
    mkdir -p .devdata/MNIST/raw
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        gzip -c "$data/MNIST/raw/$f" >".devdata/MNIST/raw/$f.gz" || exit 1
    done
    du -sh .whl .devdata
    exit 0
fi

OUT=${OUT:-/tmp/gpu_session}
DEVICE=${PYRO_VAE_BENCH_DEVICE:-cuda}
DATA=${PYRO_VAE_DATA:-.devdata}
mkdir -p "$OUT"
# torchvision's MNIST (the Pyro example loop of epoch_time) reads only uncompressed files: unpack
# the carried ones outside the working tree (so a later carry stays small).
if compgen -G "$DATA/MNIST/raw/*.gz" >/dev/null; then
    mkdir -p /tmp/pyro_vae_data/MNIST/raw
    for f in "$DATA"/MNIST/raw/*.gz; do
        gunzip -c "$f" >"/tmp/pyro_vae_data/MNIST/raw/$(basename "${f%.gz}")"
    done
    DATA=/tmp/pyro_vae_data
fi
if [ -d .whl ] && ! python3 -c "import pyro" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 PYRO_VAE_DATA="$DATA"

quick=()
nll_subset=()
if [ -n "${PYRO_VAE_GPU_SESSION_QUICK:-}" ]; then
    quick=(--repeats 2)
    nll_subset=(--subset 4 --samples 200)
fi

{
    date -u
    nvidia-smi 2>&1 | head -15
    python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
} >"$OUT/machine.txt" 2>&1

echo "== CUDA-only tests (and the step's and recording's others)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_step.py tests/test_recorded.py >"$OUT/pytest.log" 2>&1
echo "rc=$? $(tail -1 "$OUT/pytest.log")"

bench() {
    local name=$1
    shift
    echo "== $name: $*"
    echo "== $name: $*" >>"$OUT/errors.log"
    python3 -m "$@" --device "$DEVICE" --json >"$OUT/$name.json" 2>>"$OUT/errors.log"
    echo "rc=$?"
}
batches=(--batch 128,1024)
[ -n "${PYRO_VAE_GPU_SESSION_QUICK:-}" ] && batches=(--batch 16 --block 1 --warmup 2 --hidden 16)
bench step_time benchmarks.step_time "${batches[@]}" "${quick[@]}" --estimators "iwae(k=5),dreg(k=5)"
bench step_time_tf32 benchmarks.step_time "${batches[@]}" "${quick[@]}" --tf32
epoch=(--batch 128 --dataloader --data-dir "$DATA")
[ -n "${PYRO_VAE_GPU_SESSION_QUICK:-}" ] && epoch+=(--subset 512 --repeats 1)
bench epoch_time benchmarks.epoch_time "${epoch[@]}"
bench nll_throughput benchmarks.nll_throughput --data-dir "$DATA" "${nll_subset[@]}"
# AIS at Wu et al.'s scale on the device: all 1000 images x 16 chains in one batch, 20 of the 1000
# temperatures (linear in them), interpreted / recorded / recorded with TF32 leapfrog gradients.
ais=(--subset 1000 --steps 20 --variants "record=False; record=True; gradient_precision='tf32'")
[ -n "${PYRO_VAE_GPU_SESSION_QUICK:-}" ] && ais=(--subset 4 --steps 3 --hidden 16 --variants "record=True")
bench ais_throughput benchmarks.ais_throughput --data-dir "$DATA" "${ais[@]}"
