"""Seconds for AIS log p(x) (``pyro_vae.ais_log_likelihood``) on MNIST-shaped data, measured small and extrapolated.

    python -m benchmarks.ais_throughput [--device cpu|cuda] [--steps 10] [--subset 20] [--chains 16] [--json]

Times ``ais_log_likelihood(vae, x, steps=S, leapfrog=L, chains=C)`` on the first ``--subset`` N MNIST
test images (dynamically binarized; random binary images of the same shape when MNIST is not found)
with the IWAE paper's network, 784-200-200-50 tanh (``configs/mnist_dynamic.toml``), untrained: the
cost does not depend on the weights. Every temperature costs the same (one HMC transition, L + 1
gradient evaluations of log p(x, z) per example and chain), so the time of S temperatures extrapolates
linearly to 1000; the time of N examples is extrapolated linearly to 1000 images too, which holds
when the device is already saturated by N x C rows (a CPU) and overstates the time on a GPU, where a
larger batch is nearly free until the device is full. Both the measured and the extrapolated
numbers are printed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, mnist_images, parser, report, setup, sync
from pyro_vae.ais import ais_log_likelihood
from pyro_vae.model import VAE

TARGET_STEPS, TARGET_EXAMPLES = 1000, 1000  # Wu et al. 2017's scale: 1000 temperatures (and more), 16 chains


def run(args) -> dict:
    device = setup(args)
    torch.manual_seed(0)
    vae = VAE(z_dim=args.z_dim, hidden_dims=tuple(args.hidden), activation=args.activation).to(device)
    grey, data = mnist_images(device, args.data_dir, split="test", n=args.subset)
    x = torch.bernoulli(grey, generator=torch.Generator(device=device).manual_seed(0))
    settings = {"leapfrog": args.leapfrog, "chains": args.chains, "start": args.start}
    ais_log_likelihood(vae, x[:2], steps=2, **settings)  # warm-up
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        result = ais_log_likelihood(vae, x, steps=args.steps, **settings, batch_size=args.batch_size)
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    evaluations = (args.steps - 1) * (args.leapfrog + 1) + 1  # per batch: gradient evaluations (and one forward)
    batches = -(-x.shape[0] // (args.batch_size or x.shape[0]))
    scale_steps, scale_examples = TARGET_STEPS / args.steps, TARGET_EXAMPLES / x.shape[0]
    return {
        "benchmark": "ais_throughput",
        "data": data,
        "network": f"784-{'-'.join(map(str, args.hidden))}-{args.z_dim} {args.activation}, Bernoulli, untrained",
        "measured": {
            "steps": args.steps,
            "examples": x.shape[0],
            **settings,
            "seconds": seconds,
            "seconds_all": times,
            "seconds_per_temperature": seconds / args.steps,
            "ms_per_gradient_evaluation": 1000 * seconds / (evaluations * batches),
            "rows_per_gradient_evaluation": args.chains * min(x.shape[0], args.batch_size or x.shape[0]),
            "mean_log_px": float(result.log_px.mean()),
            "acceptance_rate": result.acceptance_rate,
        },
        "extrapolated": {
            "steps": TARGET_STEPS,
            "examples": TARGET_EXAMPLES,
            "chains": args.chains,
            "leapfrog": args.leapfrog,
            "seconds": seconds * scale_steps * scale_examples,
            "hours": seconds * scale_steps * scale_examples / 3600,
            "how": f"measured seconds x ({TARGET_STEPS} / {args.steps} steps) x ({TARGET_EXAMPLES} / {x.shape[0]} "
            "examples): linear in both",
        },
        "machine": machine_info(device),
    }


def parse_args(argv=None):
    p = parser(__doc__)
    p.set_defaults(hidden=[200, 200])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--steps", type=int, default=10, help="temperatures S actually run")
    p.add_argument("--subset", type=int, default=20, help="first N test images actually evaluated")
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--leapfrog", type=int, default=10)
    p.add_argument("--start", default="prior", choices=("prior", "guide"))
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: AIS's choice)")
    p.add_argument("--repeats", type=int, default=1)
    return p.parse_args(argv)


def summary(r: dict) -> str:
    m, e = r["measured"], r["extrapolated"]
    return (
        f"AIS {m['steps']} steps x {m['chains']} chains x {m['examples']} images (L={m['leapfrog']}): "
        f"{m['seconds']:.2f} s measured ({m['ms_per_gradient_evaluation']:.1f} ms per gradient evaluation of "
        f"{m['rows_per_gradient_evaluation']} rows); {e['steps']} steps x {e['chains']} chains x {e['examples']} "
        f"images ~ {e['seconds']:.0f} s ({e['hours']:.1f} h), extrapolated linearly"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args, summary)


if __name__ == "__main__":
    main()
