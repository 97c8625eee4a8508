"""Seconds per training epoch of each model structure, as ratios to the plain VAE, measured in one run.

    python -m benchmarks.structure_epoch --configs configs/mnist.toml,configs/mnist_m2.toml,... [--steps 40]
        [--repeats 3] [--threads N] [--data-dir DIR] [--json]

For each config the run's own pieces are built (``pyro_vae.runs``: the data set with the fields the
structure consumes, the VAE, the config's estimator and optimizer, ``pyro_vae.train.step.TrainStep``
as ``pyro-vae train`` builds it) and ``--steps`` training steps are timed on the run's own batches
(``(x, fields)`` from the batch source), after two untimed warm-up steps (the first chooses the
path and a recorded loss records on the second). Rounds are interleaved over the configs; the median
seconds per step times the steps of a full epoch give the seconds per epoch. Each config also
reports the step's path (``recorded``: a replayed graph; ``fast``/``plain``: the programs run on
every step) and the reason a faster path was not taken.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, parser, report, rotations, setup
from pyro_vae import estimators
from pyro_vae.checks import load_config
from pyro_vae.data import make_generator
from pyro_vae.optim import build_optimizer
from pyro_vae.runs import build_vae, load_dataset_for
from pyro_vae.train.distributed import SingleProcess
from pyro_vae.train.step import TrainStep


def build(path: str, device: torch.device, data_dir) -> dict:
    """One config's step, its batch source and its epoch length."""
    cfg = load_config(path)
    pyro.set_rng_seed(cfg.train.seed)
    pyro.clear_param_store()
    dataset = load_dataset_for(cfg, device=device, data_dir=data_dir)
    vae = build_vae(cfg.model, x_dim=dataset.x_dim, x_shape=dataset.image_shape).to(device)
    estimator = estimators.get(cfg.train.estimator)
    optimizer = build_optimizer(cfg.train.optimizer, vae.parameters(), lr=cfg.train.lr)
    step = TrainStep(vae, estimator, optimizer, clip_norm=cfg.train.clip_norm, record=cfg.train.record)
    source = SingleProcess(device).batches(dataset, cfg.train.batch_size, cfg.train.seed, vae.consumes)
    generator = make_generator(cfg.train.seed, device)
    return {
        "step": step,
        "batches": lambda: source(0, generator),
        "steps_per_epoch": -(-len(dataset.train) // cfg.train.batch_size),
        "estimator": str(cfg.train.estimator),
    }


def time_steps(entry: dict, steps: int) -> float:
    """Seconds per step over ``steps`` full batches (the loss read once at the end)."""
    # Pyro's param store is global and keyed by module names ("encoder", "decoder") that every
    # structure uses: each config registers its own tensors afresh, as in a run of its own.
    pyro.clear_param_store()
    batches = entry["batches"]()
    losses = []
    start = time.perf_counter()
    for _, (x, data) in zip(range(steps), batches, strict=False):
        losses.append(entry["step"](x, 1.0, **data))
    torch.stack(losses).sum().item()
    return (time.perf_counter() - start) / len(losses)


def path_of(step: TrainStep) -> tuple[str, str]:
    """('recorded' | the step's path, why a faster path was not taken)."""
    recorded = step.recorded
    if recorded is not None and recorded.all_replayed:
        return "recorded", ""
    reason = step.fallback_reason or (recorded.fallback_reason if recorded is not None else "")
    if recorded is None and not reason:
        reason = f"estimator {step.estimator!r} is not recordable"
    return step.path or "?", reason


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--configs", required=True, help="comma-separated config files; the first is the reference")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = setup(args)
    entries = {path: build(path, device, args.data_dir) for path in args.configs.split(",")}
    for entry in entries.values():
        time_steps(entry, 2)  # choose the path, record
    times: dict[str, list[float]] = {path: [] for path in entries}
    for order in rotations(list(entries), args.repeats):
        for path in order:
            times[path].append(time_steps(entries[path], args.steps))
    reference = next(iter(entries))
    result = {"machine": machine_info(device), "steps": args.steps, "repeats": args.repeats, "configs": {}}
    for path, entry in entries.items():
        per_step = statistics.median(times[path])
        taken, reason = path_of(entry["step"])
        result["configs"][path] = {
            "estimator": entry["estimator"],
            "seconds_per_step": per_step,
            "seconds_per_epoch": per_step * entry["steps_per_epoch"],
            "ratio_to_reference": per_step
            * entry["steps_per_epoch"]
            / (statistics.median(times[reference]) * entries[reference]["steps_per_epoch"]),
            "path": taken,
            "reason": reason,
        }
    report(result, args, _summary)


def _summary(result: dict) -> str:
    lines = [f"{'config':34} {'estimator':12} {'s/epoch':>8} {'ratio':>6}  path"]
    for path, r in result["configs"].items():
        why = f" ({r['reason']})" if r["reason"] else ""
        numbers = f"{r['seconds_per_epoch']:8.1f} {r['ratio_to_reference']:6.2f}"
        lines.append(f"{path:34} {r['estimator']:12} {numbers}  {r['path']}{why}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
