"""The Bernoulli log-density on the CPU: this library's against torch's cross-entropy, side by side.

    python -m benchmarks.bernoulli_log_density [--rows 1600] [--pixels 784] [--repeats 7] [--threads 1] [--json]

Times sum_d x_d l_d - softplus(l_d) over ``--pixels`` for ``--rows`` rows (16 AIS chains x 100 images by
default), forward alone and forward with the backward to the logits, rounds interleaved:
``library`` (``pyro_vae.likelihoods.bernoulli_log_density``: log(1 + e^-|l|), in place, exact backward),
``torch_bce`` (``-binary_cross_entropy_with_logits(...).sum(-1)``, what it replaced), and the single
elementwise ops they are made of (``log``, ``log1p``, ``exp``) for scale. Also times, on the IWAE
network (784-200-200-50 tanh, untrained) with each density: one AIS gradient evaluation
(``pyro_vae.ais.AnnealingPath.gradient``, 16 chains x rows/16 images), where the density was 40% of the
time, and the importance-sampled log p(x) (``pyro_vae.evaluate.log_likelihood``, 10 images, k = 500).
Reports minimum milliseconds over the rounds and the ratios.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, parser, report, rotations, setup
from pyro_vae import likelihoods
from pyro_vae.ais import AnnealingPath
from pyro_vae.evaluate import log_likelihood
from pyro_vae.model import VAE


def torch_bce(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


DENSITIES = {"library": likelihoods.bernoulli_log_density, "torch_bce": torch_bce}


def with_backward(density):
    def run(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().requires_grad_()
        return torch.autograd.grad(density(logits, value).sum(), logits)[0]

    return run


def _using(density):
    """``density`` as the Bernoulli likelihood's log-density while the block runs."""
    if density is likelihoods.bernoulli_log_density:
        return contextlib.nullcontext()
    return mock.patch.object(likelihoods, "bernoulli_log_density", density)


def _iwae_network(images: int, pixels: int):
    torch.manual_seed(0)
    vae = VAE(z_dim=50, hidden_dims=(200, 200), activation="tanh")
    x = torch.bernoulli(torch.full((images, pixels), 0.13), generator=torch.Generator().manual_seed(0))
    return vae, x


def ais_gradient(density, args):
    chains = 16
    vae, x = _iwae_network(max(1, args.rows // chains), args.pixels)
    path = AnnealingPath(vae, x, chains, "prior", {})
    z, beta = path.draw(), torch.tensor(0.5)

    def run():
        with _using(density):
            return path.gradient(z, beta)

    return run


def importance_sampled(density, args):
    vae, x = _iwae_network(10, args.pixels)

    def run():
        with _using(density), torch.no_grad():
            return log_likelihood(vae, x, num_samples=500)

    return run


def run(args) -> dict:
    setup(args)
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(args.rows, args.pixels, generator=g)
    value = torch.bernoulli(torch.full((args.rows, args.pixels), 0.13), generator=g)
    u = torch.exp(-logits.abs())
    cases = {f"{name}_forward": (lambda d=d: d(logits, value)) for name, d in DENSITIES.items()}
    cases |= {f"{name}_with_backward": (lambda d=d: with_backward(d)(logits, value)) for name, d in DENSITIES.items()}
    cases |= {"op_log": lambda: torch.log(u), "op_log1p": lambda: torch.log1p(u), "op_exp": lambda: torch.exp(logits)}
    if args.pixels == 784:
        cases |= {f"ais_gradient_{name}": ais_gradient(d, args) for name, d in DENSITIES.items()}
        cases |= {f"nll_is_{name}": importance_sampled(d, args) for name, d in DENSITIES.items()}
    times = {name: [] for name in cases}
    for case in cases.values():
        case()  # warm-up
    for order in rotations(list(cases), args.repeats):
        for name in order:
            start = time.perf_counter()
            cases[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    ms = {name: min(t) for name, t in times.items()}
    ratios = {
        "torch_bce_to_library_forward": ms["torch_bce_forward"] / ms["library_forward"],
        "torch_bce_to_library_with_backward": ms["torch_bce_with_backward"] / ms["library_with_backward"],
        "log1p_to_log": ms["op_log1p"] / ms["op_log"],
    }
    if "ais_gradient_library" in ms:
        ratios["ais_gradient_torch_bce_to_library"] = ms["ais_gradient_torch_bce"] / ms["ais_gradient_library"]
        ratios["nll_is_torch_bce_to_library"] = ms["nll_is_torch_bce"] / ms["nll_is_library"]
    return {
        "benchmark": "bernoulli_log_density",
        "rows": args.rows,
        "pixels": args.pixels,
        "ms": ms,
        "ratios": ratios,
        "machine": machine_info(torch.device("cpu")),
    }


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=1600)
    p.add_argument("--pixels", type=int, default=784)
    p.add_argument("--repeats", type=int, default=7)
    return p.parse_args(argv)


def summary(r: dict) -> str:
    return (
        "  ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items())
        + "  ("
        + ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items())
        + ")"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args, summary)


if __name__ == "__main__":
    main()
