"""Train the IWAE paper's VAE with four estimators and put the test NLLs beside the published ones.

Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders", Table 1 (one stochastic
layer, 784-200-200-50 tanh, dynamically binarized MNIST, NLL with k = 5000 after 3280 passes):
VAE 86.76, IWAE k=5 85.54, IWAE k=50 84.78. Tucker et al. (2019) train the guide of the same
model with doubly reparameterized gradients; a public reproduction reports 84.32 for DReG k=50.

Each estimator trains the model of configs/mnist_dynamic.toml for the same number of epochs
(``--epochs``, far fewer than the paper's 3280 on a CPU), from the same seed, and is evaluated
on the same test images with the same importance sampler (``pyro_vae.evaluate.log_likelihood``).

    python examples/compare_estimators.py --epochs 10                 # ~ an hour per estimator on a CPU
    python examples/compare_estimators.py --estimators "trace,dreg(k=5)" --epochs 2
    python examples/compare_estimators.py --smoke                     # seconds: 1 epoch, 100 images, k = 10
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch

from pyro_vae.checks import load_config
from pyro_vae.evaluate import log_likelihood
from pyro_vae.runs import load_run
from pyro_vae.specs import split_specs
from pyro_vae.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_dynamic.toml"
ESTIMATORS = "trace,iwae(k=5),iwae(k=50),dreg(k=50)"
# Test NLL (nats) after 3280 passes: Burda et al. 2015, Table 1; DReG: a public reproduction of Tucker et al. 2019.
PUBLISHED = {
    "trace": ("Burda et al. 2015 (VAE)", 86.76),
    "iwae(k=5)": ("Burda et al. 2015", 85.54),
    "iwae(k=50)": ("Burda et al. 2015", 84.78),
    "dreg(k=50)": ("DReG reproduction", 84.32),
}
SMOKE = ["data.subset=100", "train.batch_size=50", "train.eval_batch_size=100"]


def slug(spec: str) -> str:
    """A folder name for a spec: ``iwae(k=50)`` -> ``iwae_k50``."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9]+", "_", spec.replace("=", ""))).strip("_")


def log_px_of_run(run_dir: Path, k: int, num_test: int, device: str, data_dir=None) -> torch.Tensor:
    """Per-image log p(x) of a run's *last* weights (the model after the fixed budget, as in the
    paper), with k importance samples, on the first ``num_test`` test images."""
    run = load_run(run_dir, device=device, data_dir=data_dir, which="last")
    return log_likelihood(run.vae, run.dataset.test[:num_test], num_samples=k).cpu()


def paired_differences(per_image: dict[str, torch.Tensor]) -> str:
    """NLL(b) - NLL(a) ± SE for each estimator b against the first one, a, over the same images.

    Paired over images, so the SE is that of the difference, far smaller than either NLL's SE.
    """
    (first, base), *others = per_image.items()
    lines = []
    for spec, log_px in others:
        diff = base - log_px  # NLL(spec) - NLL(first)
        lines.append(f"  {spec} - {first}: {float(diff.mean()):+.2f} ± {float(diff.std()) / math.sqrt(len(diff)):.2f}")
    return "\n".join(["paired NLL differences over the same test images:", *lines]) + "\n" if lines else ""


def nll_table(rows: list[dict], epochs: int, k: int, num_test: int) -> str:
    lines = [
        f"| estimator | epochs | test NLL ± SE (k={k}, {num_test} images) | published (3280 passes) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        source, value = PUBLISHED.get(row["estimator"], ("-", None))
        published = f"{value:.2f} ({source})" if value is not None else "-"
        lines.append(f"| `{row['estimator']}` | {epochs} | {row['nll']:.2f} ± {row['nll_se']:.2f} | {published} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", default=ESTIMATORS, help=f"comma-separated specs (default {ESTIMATORS!r})")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per estimator (paper: 3280)")
    parser.add_argument("--nll-samples", type=int, default=5000, help="importance samples k for the NLL")
    parser.add_argument("--test-examples", type=int, default=1000, help="test images for the NLL (10000: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--data-dir", help="data root (else $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)")
    parser.add_argument("--out", type=Path, help="folder for the runs (default runs/compare_estimators-<time>)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    epochs = 1 if args.smoke else args.epochs
    k = 10 if args.smoke else args.nll_samples
    out = args.out or Path("runs") / f"compare_estimators-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = (SMOKE if args.smoke else []) + [f"train.epochs={epochs}", "train.nll_samples=0", "train.plots=false"]

    specs = split_specs(args.estimators)
    if not specs:
        parser.error("--estimators names no estimator")
    rows, per_image = [], {}
    for spec in specs:
        # Same config, seed and data for every estimator; only the training objective changes.
        cfg = load_config(CONFIG, [*overrides, *args.set, f"train.estimator={spec}"])
        run_dir = out / slug(spec)
        start = time.perf_counter()
        train(cfg, run_dir, device=args.device, data_dir=args.data_dir)
        minutes = (time.perf_counter() - start) / 60
        log_px = log_px_of_run(run_dir, k, args.test_examples, args.device or cfg.train.device, args.data_dir)
        per_image[spec], num_test = log_px, len(log_px)
        nll, se = -float(log_px.mean()), float(log_px.std()) / math.sqrt(num_test)
        rows.append({"estimator": spec, "nll": nll, "nll_se": se, "train_minutes": minutes, "run_dir": str(run_dir)})
        print(f"{spec}: test NLL {nll:.2f} ± {se:.2f} nats after {epochs} epochs ({minutes:.1f} min)", flush=True)

    table = nll_table(rows, epochs, k, num_test)
    print(table, end="")
    print(paired_differences(per_image), end="")
    print(
        f"Our runs: {epochs} epochs each (the paper: 3280 passes), NLL with k={k} on {num_test} test images; "
        "the published numbers are after full training and on all 10000 test images."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "nll.md").write_text(table)
    (out / "nll.json").write_text(json.dumps(rows, indent=2) + "\n")
    # Per-image log p(x), so that paired differences can be recomputed from the run folder alone.
    (out / "log_px_per_image.json").write_text(json.dumps({spec: v.tolist() for spec, v in per_image.items()}) + "\n")
    return rows


if __name__ == "__main__":
    main()
