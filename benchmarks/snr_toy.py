"""Gradient SNR against k on a Gaussian toy model in the manner of Rainforth et al. (2018, section 4).

Not a timing: ``pyro_vae.compare`` at the papers' protocol (each datapoint's own gradient) on a model
where the asymptotic regime of their Theorem 1 is reached at small k, as a control for the trained
MNIST measurements of ``docs/results/estimators.md``:

    z ~ N(0, I_D),   x | z ~ N(z, I_D),   q(z | x) = N(A x + b, (2/3) I_D),   D = 20,

built as ``VAE(x_dim=D, z_dim=D, hidden_dims=(), likelihood="gaussian(scale=1.0)")``: the decoder
is the linear map z -> W z + c (W = I, c = 0) and the encoder the linear map x -> (A x + b, raw scale).
The exact posterior is N(x / 2, I / 2): A = I / 2 + perturbation, b = perturbation (``--perturb``
sets its standard deviation), and q's variance 2/3 instead of 1/2 (Rainforth et al. fix it at 2/3
too; their prior mean is a random mu, ours 0). Then E[w^2] / E[w]^2 is about 2, so the rates
SNR ~ k^-1/2 (IWAE, inference network), k^1/2 (generative network) and k^1/2 (DReG, inference network)
show from k of about 10.

    python -m benchmarks.snr_toy --out runs/snr_toy [--examples 10] [--repeats 200] [--aggregate rms]

writes ``compare.md``, ``compare.json``, ``compare.csv`` and ``compare.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys

import pyro
import torch

from pyro_vae import VAE
from pyro_vae.compare import SNR_AGGREGATES, compare, markdown_table, write_reports
from pyro_vae.networks import MIN_SCALE

KS = (1, 3, 10, 30, 100, 300, 1000)


def toy_vae(dim: int = 20, perturb: float = 0.01, seed: int = 0) -> VAE:
    """The toy model's VAE (float64) with W = I, c = 0 and the perturbed encoder A x + b, scale sqrt(2/3)."""
    gen = torch.Generator().manual_seed(seed)
    vae = VAE(x_dim=dim, z_dim=dim, hidden_dims=(), likelihood="gaussian(scale=1.0)").double()
    with torch.no_grad():
        vae.decoder.head.weight.copy_(torch.eye(dim, dtype=torch.float64))
        vae.decoder.head.bias.zero_()
        head = vae.encoder.net.head
        head.weight.zero_()
        head.weight[:dim].copy_(0.5 * torch.eye(dim, dtype=torch.float64))
        head.weight[:dim] += perturb * torch.randn(dim, dim, dtype=torch.float64, generator=gen)
        head.bias[:dim].copy_(perturb * torch.randn(dim, dtype=torch.float64, generator=gen))
        scale = torch.full((dim,), math.sqrt(2 / 3), dtype=torch.float64) - MIN_SCALE
        head.bias[dim:].copy_(scale + torch.log(-torch.expm1(-scale)))  # inverse softplus
    return vae


def toy_data(n: int, dim: int = 20, seed: int = 1) -> torch.Tensor:
    """n draws x = z + eps from the toy model, float64."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, dtype=torch.float64, generator=gen)
    return z + torch.randn(n, dim, dtype=torch.float64, generator=gen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the reports")
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--perturb", type=float, default=0.01, help="sd of the perturbation of A and b (default 0.01)")
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated k values")
    parser.add_argument("--estimators", default="iwae,dreg", help="comma-separated k-parametrized estimators")
    parser.add_argument("--aggregate", choices=SNR_AGGREGATES, default="mean")
    parser.add_argument("--batch-mean", action="store_true", help="the batch-mean protocol instead of per example")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    vae = toy_vae(args.dim, args.perturb, seed=args.seed)
    x = toy_data(args.examples, args.dim, seed=args.seed + 1)
    specs = [f"{name}(k={k})" for name in args.estimators.split(",") for k in map(int, args.ks.split(","))]
    results = compare(
        vae,
        x,
        specs,
        repeats=args.repeats,
        seed=args.seed,
        progress=sys.stderr.isatty(),
        per_example=not args.batch_mean,
        snr_aggregate=args.aggregate,
    )
    write_reports(results, args.out)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
