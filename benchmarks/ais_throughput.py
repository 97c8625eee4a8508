"""Seconds for AIS log p(x) (``pyro_vae.ais_log_likelihood``) on MNIST-shaped data, measured small and extrapolated.

    python -m benchmarks.ais_throughput [--device cpu|cuda] [--steps 10] [--subset 20] [--chains 16]
        [--variants "record=False; record=True; gradient_precision='bf16'"] [--json]

Times ``ais_log_likelihood(vae, x, steps=S, leapfrog=L, chains=C)`` on the first ``--subset`` N MNIST
test images (dynamically binarized; random binary images of the same shape when MNIST is not found) with
the IWAE paper's network, 784-200-200-50 tanh (``configs/mnist_dynamic.toml``), untrained: the cost does
not depend on the weights. Every temperature costs the same (one HMC transition, L + 1 gradient
evaluations of log p(x, z) per example and chain), so the seconds per temperature, taken as the
difference between a run of S temperatures and one of 2 (which keeps the one-off cost of recording the
graphs out of it), extrapolate linearly to 1000; the time of N examples is extrapolated linearly to 1000
images too, which holds when the device is already saturated by N x C rows (a CPU) and overstates the
time on a GPU, where a larger batch is nearly free until the device is full. Both the measured and the
extrapolated numbers are printed. ``--variants`` times several AIS settings in turn on the same model
and images (by default: the Pyro programs interpreted at every evaluation, ``record=False``; the
recorded graphs, the default; and those with bfloat16 leapfrog gradients) and prints the speed-up over
the first, at the extrapolated scale.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, mnist_images, parser, report, setup, sync
from pyro_vae.ais import ais_log_likelihood
from pyro_vae.evaluate import nll_method
from pyro_vae.model import VAE

TARGET_STEPS, TARGET_EXAMPLES = 1000, 1000  # Wu et al. 2017's scale: 1000 temperatures (and more), 16 chains
SHORT = 2  # temperatures of the short run whose time is the fixed cost plus one transition


def run(args) -> dict:
    device = setup(args)
    torch.manual_seed(0)
    vae = VAE(z_dim=args.z_dim, hidden_dims=tuple(args.hidden), activation=args.activation).to(device)
    grey, data = mnist_images(device, args.data_dir, split="test", n=args.subset)
    x = torch.bernoulli(grey, generator=torch.Generator(device=device).manual_seed(0))
    base = f"leapfrog={args.leapfrog}, chains={args.chains}, start={args.start!r}"
    variants = [v.strip() for v in args.variants.split(";")]
    measured = {}
    for variant in variants:
        settings = asdict(nll_method(f"ais({base}, {variant})" if variant else f"ais({base})"))
        del settings["steps"]
        measured[variant or "defaults"] = measure(vae, x, args, settings)
    scale = TARGET_EXAMPLES / x.shape[0]
    extrapolated = {v: m["fixed_seconds"] + m["seconds_per_temperature"] * TARGET_STEPS for v, m in measured.items()}
    first = extrapolated[next(iter(extrapolated))]
    return {
        "benchmark": "ais_throughput",
        "data": data,
        "network": f"784-{'-'.join(map(str, args.hidden))}-{args.z_dim} {args.activation}, Bernoulli, untrained",
        "measured": {"steps": args.steps, "examples": x.shape[0], "settings": base, "by_variant": measured},
        "speedup_over_first": {variant: first / t for variant, t in extrapolated.items()},
        "extrapolated": {
            "steps": TARGET_STEPS,
            "examples": TARGET_EXAMPLES,
            "chains": args.chains,
            "leapfrog": args.leapfrog,
            "seconds": {variant: t * scale for variant, t in extrapolated.items()},
            "minutes": {variant: t * scale / 60 for variant, t in extrapolated.items()},
            "how": f"(fixed seconds + seconds per temperature x {TARGET_STEPS}) x ({TARGET_EXAMPLES} / {x.shape[0]} "
            f"examples); per temperature from the runs of {args.steps} and {SHORT} temperatures, so that the one-off "
            "cost (recording the graphs) is not multiplied",
        },
        "machine": machine_info(device),
    }


def measure(vae: VAE, x: torch.Tensor, args, settings: dict) -> dict:
    """One AIS setting, best of ``args.repeats`` timed runs of ``args.steps`` temperatures and of ``SHORT``
    (after a small warm-up run): the seconds per temperature is their difference over the difference in
    temperatures, and what is left of the short run is the fixed cost (the recording, the start draw)."""
    ais_log_likelihood(vae, x[:2], steps=2, **settings)
    seconds, result = best_time(vae, x, args, settings, args.steps)
    short, _ = best_time(vae, x, args, settings, SHORT)
    per_temperature = max(seconds - short, 0.0) / (args.steps - SHORT)
    evaluations = args.leapfrog + 1  # per temperature and batch: gradient evaluations (and one forward)
    batches = -(-x.shape[0] // (args.batch_size or x.shape[0]))
    return {
        "seconds": seconds,
        "seconds_short": short,
        "fixed_seconds": max(short - SHORT * per_temperature, 0.0),
        "seconds_per_temperature": per_temperature,
        "ms_per_gradient_evaluation": 1000 * per_temperature / (evaluations * batches),
        "rows_per_gradient_evaluation": args.chains * min(x.shape[0], args.batch_size or x.shape[0]),
        "mean_log_px": float(result.log_px.mean()),
        "acceptance_rate": result.acceptance_rate,
    }


def best_time(vae: VAE, x: torch.Tensor, args, settings: dict, steps: int):
    """(best seconds over ``args.repeats`` runs of ``steps`` temperatures, the last run's result)."""
    times = []
    for _ in range(args.repeats):
        sync(x.device)
        start = time.perf_counter()
        result = ais_log_likelihood(vae, x, steps=steps, **settings, batch_size=args.batch_size)
        sync(x.device)
        times.append(time.perf_counter() - start)
    return min(times), result


def parse_args(argv=None):
    p = parser(__doc__)
    p.set_defaults(hidden=[200, 200])
    p.add_argument("--activation", default="tanh")
    p.add_argument("--steps", type=int, default=10, help=f"temperatures S actually run (more than {SHORT})")
    p.add_argument("--subset", type=int, default=20, help="first N test images actually evaluated")
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--leapfrog", type=int, default=10)
    p.add_argument("--start", default="prior", choices=("prior", "guide"))
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: AIS's choice)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--variants",
        default="record=False; record=True; gradient_precision='bf16'",
        help="';'-separated AIS settings timed in turn on the same model and images (ratios to the first); "
        "the default: the Pyro programs at every evaluation, recorded graphs, and recorded with bf16 gradients",
    )
    return p.parse_args(argv)


def summary(r: dict) -> str:
    m, e = r["measured"], r["extrapolated"]
    lines = []
    for variant, one in m["by_variant"].items():
        lines.append(
            f"AIS {m['steps']} steps x {m['examples']} images ({m['settings']}; "
            f"{variant}): {one['seconds']:.2f} s measured ({one['ms_per_gradient_evaluation']:.1f} ms "
            f"per gradient evaluation of {one['rows_per_gradient_evaluation']} rows, acceptance "
            f"{one['acceptance_rate']:.3f}, x{r['speedup_over_first'][variant]:.2f}); {e['steps']} steps x "
            f"{e['chains']} chains x {e['examples']} images ~ {e['minutes'][variant]:.1f} min, extrapolated linearly"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args, summary)


if __name__ == "__main__":
    main()
