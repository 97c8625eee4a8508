"""The IWAE paper's VAE with two stochastic layers on dynamically binarized MNIST, trained by the library.

Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders", section 5: two Gaussian
latent layers, 784-(200-200)-100-(100-100)-50 with tanh. Table 1 reports test NLLs (k = 5000) of
85.33 nats for the VAE and 82.90 for IWAE with k = 50. The model is the structure ``two_layer``
(pyro_vae/structures/two_layer.py); its two Pyro programs, with the ``pyro.module`` calls left out:

    def model(self, x, beta=1.0):                       # p(z2) p(z1|z2) p(x|z1)
        with data_plate(x):
            with kl_scale(beta):
                z2 = pyro.sample("z2", self.prior(self.encoder))        # N(0, I)
                z1 = pyro.sample("z1", self.z1_decoder(z2))             # N(mu(z2), diag(sigma(z2)^2))
            pyro.sample("x", self.decode(z1), obs=self.likelihood.prepare(x))

    def guide(self, x, beta=1.0):                       # q(z1|x) q(z2|z1), bottom-up
        with data_plate(x), kl_scale(beta):
            z1 = pyro.sample("z1", self.posterior(x))                   # N(mu(x), diag(sigma(x)^2))
            pyro.sample("z2", self.z2_encoder(z1))                      # N(mu(z1), diag(sigma(z1)^2))

The config is configs/mnist_dynamic_2layer.toml; besides z_dim (z1's size, 100), its one line
``model.structure = "two_layer(z2_dim=50, hidden=[100, 100], activation='tanh')"`` is all that
differs from the one-layer configs/mnist_dynamic.toml.

    python examples/two_layer_vae.py                                         # the VAE row (trace)
    python examples/two_layer_vae.py --set train.estimator="iwae(k=50)"      # the IWAE k=50 row
    python examples/two_layer_vae.py --smoke                                 # seconds: 1 epoch, 500 images
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from pyro_vae.checks import load_config
from pyro_vae.evaluate import log_likelihood
from pyro_vae.runs import load_run
from pyro_vae.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_dynamic_2layer.toml"
PAPER_NLL = {"VAE": 85.33, "IWAE k=50": 82.90}  # Burda et al. 2015, Table 1, two stochastic layers
SMOKE = ["data.subset=500", "train.epochs=1", "train.batch_size=100", "train.plots=false"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--nll-samples", type=int, default=5000, help="importance samples k for the NLL")
    parser.add_argument("--data-dir", help="data root (else $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/two_layer_vae-<time>)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    overrides = (SMOKE if args.smoke else []) + args.set + ["train.nll_samples=0"]  # the NLL is computed below
    k = 10 if args.smoke else args.nll_samples
    out = args.out or Path("runs") / f"two_layer_vae-{time.strftime('%Y%m%d-%H%M%S')}"

    # 1. Train: the config names the structure and the sizes of both layers; every estimator works
    #    on it from the Pyro traces, site by site (closed_form excepted: it has no closed form).
    cfg = load_config(CONFIG, overrides)
    result = train(cfg, out, device=args.device, data_dir=args.data_dir)
    print(f"trained {result['epoch']} epochs ({result['status']}) with {cfg.train.estimator}; run folder {out}")

    # 2. Evaluate: the best weights, k importance samples of (z1, z2) per test image.
    run = load_run(out, device=args.device or cfg.train.device, data_dir=args.data_dir)
    log_px = log_likelihood(run.vae, run.dataset.test, num_samples=k)
    nll = -float(log_px.mean())
    se = float(log_px.std()) / math.sqrt(len(log_px))  # over test examples
    paper = ", ".join(f"{name} {value:.2f}" for name, value in PAPER_NLL.items())
    print(
        f"test NLL {nll:.2f} ± {se:.2f} nats (k={k}, {len(log_px)} {run.dataset.name} test images; "
        f"± is the standard error over examples). IWAE paper, two layers: {paper}"
    )
    return {"nll": nll, "nll_se": se, "num_samples": k, "run_dir": str(out)}


if __name__ == "__main__":
    main()
