"""Pyro's VAE tutorial (https://pyro.ai/examples/vae.html), written with pyro_vae's pieces.

The set-up is the tutorial's: MNIST grey levels in [0, 1] under a Bernoulli likelihood, a
784-400-50 network with softplus, a standard normal prior and a diagonal Gaussian guide, trained
on all 60 000 training images with Pyro's SVI, Trace_ELBO and Adam (lr 1e-3), batch 256. The
tutorial's plot shows a test ELBO of about -108 after 10 epochs and -104.7 after 20.

(A Bernoulli on grey levels is what the tutorial does; the number is an ELBO of that model, not a
bound on a likelihood of the data. See examples/mnist_dynamic_vae.py for a real NLL.)

    python examples/mnist_vae.py                 # 20 epochs, figures in runs/mnist_vae-<time>/
    python examples/mnist_vae.py --smoke         # seconds: 1 epoch on 1000 images
    python examples/mnist_vae.py --data-dir ../shared/data --epochs 10

The library does the same with one command: pyro-vae train --config configs/mnist.toml
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import pyro.optim
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE
from pyro_vae.data import batches, load_dataset, make_generator, resolve_device
from pyro_vae.evaluate import elbo
from pyro_vae.plots import write_all_figures

TUTORIAL_TEST_ELBO = {10: -108.0, 20: -104.7}  # read off the tutorial's plot


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", help="data root (else $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)")
    parser.add_argument("--out", type=Path, help="folder for metrics and figures (default runs/mnist_vae-<time>)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run: 1 epoch on 1000 images")
    args = parser.parse_args(argv)
    epochs, subset = (1, 1000) if args.smoke else (args.epochs, None)
    out = args.out or Path("runs") / f"mnist_vae-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    # 1. Data: MNIST grey levels, loaded once onto the device. val_size=0: the tutorial trains on all 60k.
    pyro.set_rng_seed(args.seed)
    device = resolve_device(args.device)
    mnist = load_dataset("mnist", root=args.data_dir, device=device, val_size=0, subset=subset)
    print(mnist)

    # 2. The model p(z) p(x|z) and the guide q(z|x), as in the tutorial.
    vae = VAE(x_dim=784, z_dim=50, hidden_dims=(400,), activation="softplus", prior="normal", likelihood="bernoulli")
    vae.to(device)

    # 3. Stochastic variational inference: maximize the ELBO with Adam.
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())
    generator = make_generator(args.seed, device)  # the batch order, drawn on the device

    history = []
    for epoch in range(1, epochs + 1):
        start = time.time()
        total = 0.0
        for x in batches(mnist.train, batch_size=256, generator=generator):
            total += svi.step(x)  # minus the ELBO summed over the batch
        train_elbo = -total / len(mnist.train)
        test_elbo = elbo(vae, mnist.test, batch_size=1000)  # mean over the test set, at the trained weights
        record = {"epoch": epoch, "train_elbo": train_elbo, "test_elbo": test_elbo, "seconds": time.time() - start}
        history.append(record)
        reference = f"  (tutorial: about {TUTORIAL_TEST_ELBO[epoch]})" if epoch in TUTORIAL_TEST_ELBO else ""
        print(f"epoch {epoch:3d}  train ELBO {train_elbo:8.2f}  test ELBO {test_elbo:8.2f}{reference}")

    # 4. Results: per-epoch numbers and the figures (reconstructions, samples, latent codes, ...).
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in history)
    figures = write_all_figures(vae, mnist, history, out)
    print(f"wrote {out / 'metrics.jsonl'} and {len(figures)} figures to {out}")
    return history


if __name__ == "__main__":
    main()
