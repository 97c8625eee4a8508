"""A VampPrior epoch against a standard-prior epoch, side by side in one run, with the arithmetic floor.

    python -m benchmarks.vamp_epoch [--configs STANDARD.toml,VAMP.toml] [--steps 30] [--repeats 3]
        [--threads 1] [--data-dir DIR] [--json]

For each config (default: the VampPrior paper's recipe with its standard prior, then with
vamp(components=500); configs/paper/tomczak_*.toml) the run's own training step is built as
``pyro-vae train`` builds it (:mod:`benchmarks.structure_epoch`) and timed on its own batches,
rounds interleaved; the VampPrior is timed twice, with this library's density of the mixture
(:mod:`pyro_vae.mixtures`, two matrix products) and with ``MixtureSameFamily``'s (N, K, D)
broadcasting that it replaced. Seconds per epoch = median seconds per step x steps per epoch
(the evaluation at the end of an epoch, forward passes only, is left out: it adds about the same
to both).

The arithmetic floor: torch's ``FlopCounterMode`` counts the floating-point operations of one
step's loss and backward for each config. The VampPrior's extra work is the encoder's forward and
backward on the K pseudo-inputs (and the gradient to the pseudo-inputs themselves); at batch 100
and K = 500 that is several times the standard step's own work, so ``flop_ratio`` bounds what any
exact implementation can reach when both steps run at the same arithmetic rate.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, parser, report, rotations, setup
from benchmarks.structure_epoch import build, path_of, time_steps
from pyro_vae.mixtures import DiagonalGaussianMixture

DEFAULT = "configs/paper/tomczak_standard.toml,configs/paper/tomczak_vamp.toml"


@contextlib.contextmanager
def broadcast_density():
    """The mixture's log density as ``MixtureSameFamily`` computes it: the implementation replaced."""
    original = DiagonalGaussianMixture.log_prob
    DiagonalGaussianMixture.log_prob = dist.MixtureSameFamily.log_prob
    try:
        yield
    finally:
        DiagonalGaussianMixture.log_prob = original


def step_flops(entry: dict) -> int:
    """Floating-point operations of one training step's loss and backward (matrix products and convolutions)."""
    step = entry["step"]
    x, data = next(iter(entry["batches"]()))
    with FlopCounterMode(display=False) as counter:
        step.estimator.loss(step.vae, x, 1.0, **data).backward()
    step.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def variants(configs: list[str], device, data_dir) -> dict[str, tuple[dict, contextlib.AbstractContextManager]]:
    """name -> (built step, the context it runs in)."""
    standard, vamp = configs
    out = {"standard": (build(standard, device, data_dir), contextlib.nullcontext)}
    out["vamp"] = (build(vamp, device, data_dir), contextlib.nullcontext)
    out["vamp_broadcast"] = (build(vamp, device, data_dir), broadcast_density)
    return out


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--configs", default=DEFAULT, help="STANDARD,VAMP config files")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = setup(args)
    entries = variants(args.configs.split(","), device, args.data_dir)
    flops = {name: step_flops(entry) for name, (entry, _) in entries.items() if name != "vamp_broadcast"}
    for entry, context in entries.values():
        with context():
            time_steps(entry, 2)  # choose the path, record
    times: dict[str, list[float]] = {name: [] for name in entries}
    for order in rotations(list(entries), args.repeats):
        for name in order:
            entry, context = entries[name]
            with context():
                times[name].append(time_steps(entry, args.steps))
    per_step = {name: statistics.median(t) for name, t in times.items()}
    steps_per_epoch = entries["standard"][0]["steps_per_epoch"]
    result = {
        "machine": machine_info(device),
        "configs": args.configs,
        "steps": args.steps,
        "repeats": args.repeats,
        "seconds_per_epoch": {name: s * steps_per_epoch for name, s in per_step.items()},
        "ratio_to_standard": {name: s / per_step["standard"] for name, s in per_step.items()},
        "gflop_per_step": {name: f / 1e9 for name, f in flops.items()},
        "flop_ratio": flops["vamp"] / flops["standard"],
        "paths": {name: path_of(entry["step"])[0] for name, (entry, _) in entries.items()},
    }
    pyro.clear_param_store()
    report(result, args, _summary)


def _summary(result: dict) -> str:
    lines = [f"{'variant':16} {'s/epoch':>8} {'ratio':>6}"]
    for name, seconds in result["seconds_per_epoch"].items():
        lines.append(f"{name:16} {seconds:8.1f} {result['ratio_to_standard'][name]:6.2f}")
    lines.append(f"FLOP ratio vamp/standard per step: {result['flop_ratio']:.2f} (the floor of an exact step)")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
