#!/usr/bin/env bash
# The IWAE paper's Table 1 (one stochastic layer: VAE, IWAE k=5, IWAE k=50; configs/paper/burda_*.toml)
# trained to the end on a GPU, in as many device sessions as it takes: each call trains the three
# models side by side for MINUTES (default 11) of wall time, stops them with SIGINT (the loop keeps
# the last finished epoch in checkpoint.pt), and brings every run folder back as one tar file; the
# next call, given those folders, resumes them. A run that reaches its 3280th epoch evaluates
# itself (k = 5000 importance samples on the 10k test images) and writes evaluation.json.
#
# Prepare on the development machine, in the repository root (wheels and MNIST, as gpu_session.sh):
#
#   bash benchmarks/gpu_session.sh --prepare ../shared/data
#
# First session, with the device tool: carry [".whl", ".devdata"], command
# "bash benchmarks/gpu_burda.sh", timeout_s 780. Back in $OUT: machine.txt, progress.txt (epochs done
# and seconds per epoch of each model: the numbers that say how many sessions remain) and
# burda_vae.tar, burda_iwae_k5.tar, burda_iwae_k50.tar.
# Later sessions: unpack the tars into runs_burda/ here (`mkdir -p runs_burda && for t in
# FILES_AT/*.tar; do tar -xf $t -C runs_burda; done`; runs_burda/ is in .gitignore) and carry
# [".whl", ".devdata", "runs_burda"] with the same command.
#
# Sizes: a run folder is about 14 MB (checkpoint.pt and best.pt: weights and Adam's moments of
# 0.45M parameters), under the device tool's 16 MiB per file. docs/results/reproductions.md says how
# long each model takes.
#
# PYRO_VAE_BENCH_DEVICE=cpu PYRO_VAE_BURDA_QUICK=1 bash benchmarks/gpu_burda.sh runs the same
# sequence on a CPU for a few seconds on a subset, to check the script itself.
set -uo pipefail

OUT=${OUT:-/tmp/gpu_burda}
DEVICE=${PYRO_VAE_BENCH_DEVICE:-cuda}
DATA=${PYRO_VAE_DATA:-.devdata}
MINUTES=${MINUTES:-11}
RUNS=${PYRO_VAE_BURDA_RUNS:-runs_burda}
THREADS=${THREADS:-4}  # torch threads per model: three models share the CPU cores that feed the GPU
mkdir -p "$OUT" "$RUNS"
if [ -d .whl ] && ! python3 -c "import pyro" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 PYRO_VAE_DATA="$DATA"

extra=()
duration="${MINUTES}m"
if [ -n "${PYRO_VAE_BURDA_QUICK:-}" ]; then
    extra=(--set data.subset=400 --set train.epochs=2 --set train.nll_samples=10)
    duration=${PYRO_VAE_BURDA_SECONDS:-60}s
fi

{
    date -u
    nvidia-smi 2>&1 | head -15
    python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
} >"$OUT/machine.txt" 2>&1

models=(burda_vae burda_iwae_k5 burda_iwae_k50)
for name in "${models[@]}"; do
    run="$RUNS/$name"
    if [ -f "$run/checkpoint.pt" ]; then
        args=(--resume --out "$run")
    else
        args=(--config "configs/paper/$name.toml" --out "$run")
    fi
    # SIGINT lets the loop finish writing its checkpoint; the run resumes from the last finished epoch
    timeout --signal=INT --kill-after=60 "$duration" python3 -m pyro_vae train "${args[@]}" \
        --device "$DEVICE" --set train.threads="$THREADS" --no-progress "${extra[@]}" >"$OUT/$name.log" 2>&1 &
done
wait

{
    for name in "${models[@]}"; do
        python3 - "$RUNS/$name" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
records = [json.loads(line) for line in (run / "metrics.jsonl").open()] if (run / "metrics.jsonl").exists() else []
seconds = [r["seconds"] for r in records[-20:]]
evaluation = run / "evaluation.json"
nll = json.loads(evaluation.read_text()).get("test_nll") if evaluation.exists() else None
print(f"{run.name}: {len(records)} epochs done, {sum(seconds) / max(1, len(seconds)):.2f} s/epoch (last 20), test NLL {nll}")
EOF
    done
} >"$OUT/progress.txt" 2>&1
cat "$OUT/progress.txt"
for name in "${models[@]}"; do
    tar -cf "$OUT/$name.tar" -C "$RUNS" --exclude=.lock "$name"
done
