"""Pyro's conditional-VAE example (examples/cvae, https://pyro.ai/examples/cvae.html), with pyro_vae.

Sohn, Lee & Yan (2015), "Learning Structured Output Representation using Deep Conditional Generative
Models": given 1, 2 or 3 quadrants x_in of an MNIST digit, predict the rest y. Two models, each one
registered structure trained by the library from configs/mnist_cvae.toml:

- the baseline ("NN"), ``cvae_baseline``: a network x_in -> y_hat under a Bernoulli likelihood of the
  predicted pixels (Pyro's ``MaskedBCELoss``); its number is -log p(y|x_in) exactly;
- the CVAE, ``cvae``: z ~ p(z|x_in) (prior network), y ~ p(y|z) (generation network), trained with the
  ELBO and the recognition network q(z|x_in, y). Its Pyro model and guide are printed first.

Both are reported as Pyro's table does, the test -ELBO of y given x_in (for the baseline that is its
masked cross-entropy), beside the importance-sampled -log p(y|x_in) and Pyro's published numbers.
MNIST grey levels under a Bernoulli, as in Pyro's example: cross-entropies, not likelihoods.

    python examples/cvae_quadrants.py                      # 1 quadrant, <= 30 epochs each (2-core CPU: ~1.5 h)
    python examples/cvae_quadrants.py --quadrants 1 2 3    # Pyro's three columns
    python examples/cvae_quadrants.py --smoke              # seconds: 1 epoch on 1000 images, small nets
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

from pyro_vae.checks import load_config
from pyro_vae.structures.cvae import CVAE
from pyro_vae.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_cvae.toml"
# Pyro's tutorial (tutorial/source/cvae.ipynb, "estimated CLLs", lower is better): the test -ELBO of y
# given x_in with 10 particles, after at most 50 epochs with early stopping (patience 3).
PYRO_TABLE = {"cvae_baseline": {1: 100.4, 2: 61.9, 3: 25.4}, "cvae": {1: 71.8, 2: 51.0, 3: 24.2}}
NAMES = {"cvae_baseline": "NN (baseline)", "cvae": "CVAE"}
SMOKE = [
    "data.subset=1000",
    "data.val_size=200",
    "model.hidden_dims=[64]",
    "model.z_dim=8",
    "train.epochs=1",
    "train.plots=false",
    "train.nll_samples=10",
]


def show_model_and_guide() -> None:
    """The CVAE's Pyro programs, as the library runs them (pyro_vae/structures/cvae.py)."""
    for program in (CVAE.model, CVAE.guide, CVAE.conditional_prior, CVAE.observe):
        print(inspect.getsource(program))


def train_both(quadrants: int, overrides: list[str], out: Path, args) -> dict[str, dict]:
    """Train the baseline and the CVAE on ``quadrants`` given quadrants; their evaluation.json contents."""
    results = {}
    for structure in ("cvae_baseline", "cvae"):
        sets = [*overrides, f"data.quadrants={quadrants}", f"model.structure={structure}"]
        run = train(
            load_config(CONFIG, sets), out / f"q{quadrants}" / structure, device=args.device, data_dir=args.data_dir
        )
        print(f"{NAMES[structure]}, {quadrants} quadrant(s): {run['epoch']} epochs ({run['status']}), {run['run_dir']}")
        results[structure] = run["evaluation"]
    return results


def print_table(table: dict[int, dict[str, dict]]) -> None:
    """Rows NN and CVAE, one column per quadrant count: our -ELBO, our IS -log p(y|x_in), Pyro's number."""
    columns = sorted(table)
    print("\ntest -ELBO of y given x_in (Pyro's table) / importance-sampled -log p(y|x_in), nats per image")
    print(f"{'':16}" + "".join(f"{f'{q} quadrant(s)':>34}" for q in columns))
    for structure in ("cvae_baseline", "cvae"):
        cells = []
        for q in columns:
            report = table[q][structure]
            nll = f"{report['test_nll']:.1f}" if report.get("test_nll") is not None else "-"
            cells.append(f"{-report['test_elbo']:7.1f} / {nll:>6} (Pyro {PYRO_TABLE[structure][q]:5.1f})")
        print(f"{NAMES[structure]:16}" + "".join(f"{cell:>34}" for cell in cells))
    k = next(iter(table.values()))["cvae"].get("nll_samples")
    print(f"(-log p(y|x_in) with k = {k}; pyro-vae evaluate --run DIR --nll-samples 5000 for k = 5000)")


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quadrants", type=int, nargs="+", default=[1], choices=(1, 2, 3))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--data-dir", help="data root (else $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)")
    parser.add_argument("--out", type=Path, help="folder of the runs (default runs/cvae_quadrants-<time>)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / f"cvae_quadrants-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = (SMOKE if args.smoke else []) + args.set

    show_model_and_guide()
    table = {q: train_both(q, overrides, out, args) for q in args.quadrants}
    print_table(table)
    return table


if __name__ == "__main__":
    main()
