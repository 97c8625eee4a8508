"""Numbers that a refactoring must not change, recorded on the CPU and compared across commits.

Runs the two trainings of the redesign issue (``docs/results/redesign.md``) and writes one JSON
object: per epoch the train and test ELBO (and val_elbo/val_bound where there is a validation
set), and the run's ``evaluation.json`` numbers.

    python -m benchmarks.behaviour_check --data-dir ../shared/data --out before.json
    python -m benchmarks.behaviour_check --data-dir ../shared/data --out after.json --compare before.json

``--compare`` prints every number side by side with its absolute difference and exits 1 when
one differs by more than ``--tolerance`` (1e-4 nats by default).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "mnist_trace": ["--config", "configs/mnist.toml"],
    # the config's schedule and warm-up when the reference numbers were recorded
    "mnist_static_iwae5": [
        *("--config", "configs/mnist_static.toml", "--set", 'train.estimator="iwae(k=5)"'),
        *("--set", "train.lr_schedule=constant", "--set", "train.warmup_epochs=0"),
    ],
}
COMMON = ["--set", "train.epochs=2", "--set", "data.subset=5000", "--seed", "0", "--device", "cpu"]
EPOCH_KEYS = ("train_elbo", "val_elbo", "val_bound", "test_elbo")
EVALUATION_KEYS = ("test_elbo", "test_nll", "test_nll_se", "bits_per_dim", "active_units", "num_examples")


def run_one(name: str, args: list[str], data_dir: str, workdir: Path) -> dict:
    out = workdir / name
    command = [sys.executable, "-m", "pyro_vae", "train", *args, *COMMON, "--data-dir", data_dir, "--out", str(out)]
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluation = json.loads((out / "evaluation.json").read_text())
    return {
        "command": " ".join(["pyro-vae", "train", *args, *COMMON]),
        "epochs": [{k: e.get(k) for k in ("epoch", *EPOCH_KEYS)} for e in epochs],
        "evaluation": {k: evaluation.get(k) for k in EVALUATION_KEYS},
    }


def flatten(result: dict) -> dict[str, float]:
    """``run.epoch2.test_elbo`` -> number, for every number in a result."""
    flat = {}
    for run, numbers in result.items():
        for epoch in numbers["epochs"]:
            for key in EPOCH_KEYS:
                flat[f"{run}.epoch{epoch['epoch']}.{key}"] = epoch[key]
        for key, value in numbers["evaluation"].items():
            flat[f"{run}.evaluation.{key}"] = value
    return flat


def compare(before: dict, after: dict, tolerance: float) -> bool:
    old, new = flatten(before), flatten(after)
    ok = True
    print(f"{'number':<48} {'before':>14} {'after':>14} {'|diff|':>10}")
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None and b is None:
            continue
        diff = math.inf if a is None or b is None else abs(a - b)
        bad = diff > tolerance
        ok &= not bad
        print(f"{key:<48} {a!s:>14} {b!s:>14} {diff:>10.2e}{'  <-- differs' if bad else ''}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", help="write the JSON here (else stdout)")
    parser.add_argument("--compare", help="a JSON written before: compare with it")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = {name: run_one(name, run_args, args.data_dir, Path(tmp)) for name, run_args in RUNS.items()}
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.compare:
        return 0 if compare(json.loads(Path(args.compare).read_text()), result, args.tolerance) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
