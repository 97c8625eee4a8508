"""Time one training step: hand-written PyTorch vs plain Pyro SVI vs pyro_vae's default step.

    python benchmarks/step_time.py [--device cpu|cuda] [--batch 128,1024] [--json] [--repeats N] [--network conv]

Variants, timed interleaved in one run (see benchmarks/README.md):

- ``torch``: the hand-written reference (784-400-50 softplus, BCE on logits, analytic KL,
  ``torch.optim.Adam`` with the implementation pyro_vae's default ``adam`` picks: fused on CPU and
  CUDA); ``torch_foreach`` the same with ``foreach=True``;
- ``pyro_svi``: ``SVI(vae.model, vae.guide, pyro.optim.Adam, Trace_ELBO())`` as Pyro's docs show it
  (``svi.step`` returns a float: one host sync per step, as in every Pyro example);
- ``project``: ``pyro_vae.train.step.TrainStep`` with ``estimators.get("trace")`` and the loop's optimizer
  (``pyro_vae.optim.build_optimizer("adam")``), i.e. what ``pyro-vae train`` runs;
- ``project_unrecorded``: ``project`` with ``record=False``: the lean loss runs the Pyro programs on
  every step instead of replaying their recorded graph (``pyro_vae.recorded``);
- ``project_plain``: the same with ``fast=False`` (the estimator's loss as written, validation on);
- ``project_foreach``: ``project`` with ``adam(fused=False)`` (compare with ``torch_foreach``);
- ``est_<spec>`` and ``est_<spec>_unrecorded`` for every ``--estimators`` spec (e.g. ``iwae(k=5)``):
  the fast step with that estimator, recorded and not;
- ``project_meanfield``: ``project`` with ``estimators.get("meanfield")`` (analytic KL, the reference's
  own objective), to separate the Monte Carlo KL's cost from the cost of running Pyro programs.

``--network conv`` runs every variant on the conv VAE of ``configs/mnist_conv.toml`` (``conv(channels=32,
depth=2)`` both ways on 1x28x28; ``--channels`` sets the width) instead of the MLP: the reference is
``ReferenceConvVAE``, the same layers written out in plain PyTorch.

JSON: per batch size ``ms_per_step`` (median over rounds) for each variant, ``ratio_project_to_torch``
= project / torch, ``ratio_pyro_to_torch`` = pyro_svi / torch, paired (per-round) ratios, and
``machine``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ParamStoreSlot,
    ReferenceConvVAE,
    ReferenceVAE,
    interleaved,
    machine_info,
    mnist_images,
    parser,
    reference_optimizer,
    reference_step,
    report,
    setup,
    summarize,
)
from pyro_vae import estimators
from pyro_vae.model import VAE
from pyro_vae.optim import build_optimizer
from pyro_vae.specs import split_specs
from pyro_vae.train.step import TrainStep

LR = 1e-3


def _call_on(step, batches: torch.Tensor):
    return lambda i: step(batches[i % batches.shape[0]])


def conv_spec(channels: int) -> str:
    """The body of ``configs/mnist_conv.toml`` at width ``channels``; ``ReferenceConvVAE`` writes it out."""
    return f"conv(channels={channels}, depth=2, kernel=4, activation='relu')"


# --network -> (the hand-written reference, the project's VAE), each from the parsed arguments
NETWORK_PAIRS = {
    "mlp": (
        lambda args: ReferenceVAE(784, args.z_dim, tuple(args.hidden)),
        lambda args: VAE(z_dim=args.z_dim, hidden_dims=tuple(args.hidden)),
    ),
    "conv": (
        lambda args: ReferenceConvVAE(args.z_dim, args.channels),
        lambda args: VAE(
            z_dim=args.z_dim, x_shape=(1, 28, 28), encoder=conv_spec(args.channels), decoder=conv_spec(args.channels)
        ),
    ),
}


def build_variants(batches: torch.Tensor, args, device: torch.device):
    """name -> fn(i) doing one step on batch i (cycling), a private param store per variant, and
    the project variants' TrainSteps (for their path and recording)."""
    make_reference, make_vae = NETWORK_PAIRS[args.network]
    variants, slots, steps = {}, {}, {}

    for name, kind in (("torch", "default"), ("torch_foreach", "foreach")):
        torch.manual_seed(0)
        ref = make_reference(args).to(device)
        variants[name] = _call_on(reference_step(ref, reference_optimizer(ref.parameters(), LR, kind)), batches)

    torch.manual_seed(0)
    vae_b = make_vae(args).to(device)
    svi = SVI(vae_b.model, vae_b.guide, pyro.optim.Adam({"lr": LR}), loss=Trace_ELBO())
    variants["pyro_svi"] = _call_on(svi.step, batches)

    project = [
        ("project", True, True, "adam", "trace"),
        ("project_unrecorded", True, False, "adam", "trace"),
        ("project_plain", False, False, "adam", "trace"),
        ("project_foreach", True, True, "adam(fused=False)", "trace"),
        ("project_meanfield", True, True, "adam", "meanfield"),
    ]
    for spec in args.estimators:  # other estimators, recorded and not: what recording buys them
        name = _estimator_variant(spec)
        project += [(name, True, True, "adam", spec), (f"{name}_unrecorded", True, False, "adam", spec)]
    for name, fast, record, adam, estimator in project:
        torch.manual_seed(0)
        vae = make_vae(args).to(device)
        optimizer = build_optimizer(adam, vae.parameters(), LR)
        ts = TrainStep(vae, estimators.get(estimator), optimizer, fast=fast, record=record)
        variants[name] = _call_on(ts, batches)
        steps[name] = ts

    for name in variants:
        slots[name] = ParamStoreSlot()
    return variants, slots, steps


def _estimator_variant(spec: str) -> str:
    """The variant name of an ``--estimators`` spec: ``iwae(k=5)`` -> ``est_iwae_k_5``."""
    return "est_" + re.sub(r"\W+", "_", spec).strip("_")


def _estimator_entry(spec: str, ms: dict[str, float], steps: dict[str, TrainStep]) -> dict:
    name = _estimator_variant(spec)
    recorded, unrecorded = ms[name], ms[f"{name}_unrecorded"]
    return {
        "ms_per_step": recorded,
        "ms_per_step_unrecorded": unrecorded,
        "ratio_recorded_to_unrecorded": recorded / unrecorded,
        "recorded": _replayed(steps[name]),
    }


def _replayed(step: TrainStep) -> bool:
    """Whether the step's loss ran as a recorded graph for every batch shape it saw."""
    return step.recorded is not None and step.recorded.all_replayed


def run(args) -> dict:
    device = setup(args)
    x, data = mnist_images(device, args.data_dir)
    network = conv_spec(args.channels) if args.network == "conv" else f"mlp(hidden={args.hidden})"
    result = {"benchmark": "step_time", "data": data, "network": network, "machine": machine_info(device)}
    result["batches"] = {}
    for batch_size in args.batch:
        g = torch.Generator(device="cpu").manual_seed(0)
        perm = torch.randperm(x.shape[0], generator=g)[: args.num_batches * batch_size].to(device)
        batches = x[perm].reshape(args.num_batches, batch_size, -1).contiguous()
        variants, slots, steps = build_variants(batches, args, device)
        times = interleaved(variants, slots, device, args.repeats, args.block, args.warmup)
        summary = summarize(times, base="torch")
        ms = {k: v["median"] for k, v in summary.items() if ":" not in k}
        cpu = {k.split(":")[0]: v["median"] for k, v in summary.items() if k.endswith(":cpu")}
        result["batches"][str(batch_size)] = {
            "ms_per_step": ms,
            "cpu_ms_per_step": cpu,
            "quartiles_ms": {k: [v["q1"], v["q3"]] for k, v in summary.items() if ":" not in k},
            "ratio_project_to_torch": ms["project"] / ms["torch"],
            "ratio_pyro_to_torch": ms["pyro_svi"] / ms["torch"],
            "ratio_project_unrecorded_to_torch": ms["project_unrecorded"] / ms["torch"],
            "ratio_project_plain_to_torch": ms["project_plain"] / ms["torch"],
            "ratio_project_to_torch_foreach": ms["project"] / ms["torch_foreach"],
            "paired_ratio_project_to_torch": summary["project"]["paired_ratio_to_torch"],
            "paired_ratio_pyro_to_torch": summary["pyro_svi"]["paired_ratio_to_torch"],
            "ratio_project_foreach_to_torch_foreach": ms["project_foreach"] / ms["torch_foreach"],
            "ratio_project_meanfield_to_torch": ms["project_meanfield"] / ms["torch"],
            "cpu_ratio_project_to_torch": cpu["project"] / cpu["torch"],
            "cpu_ratio_pyro_to_torch": cpu["pyro_svi"] / cpu["torch"],
            "cpu_ratio_project_foreach_to_torch_foreach": cpu["project_foreach"] / cpu["torch_foreach"],
            "estimators": {spec: _estimator_entry(spec, ms, steps) for spec in args.estimators},
            "project_path": steps["project"].path,
            "project_recorded": _replayed(steps["project"]),
            "rounds": args.repeats,
            "steps_per_round": args.block,
        }
    return result


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[128, 1024])
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    p.add_argument("--block", type=int, default=5, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant")
    p.add_argument("--num-batches", type=int, default=8, help="distinct batches cycled through")
    p.add_argument("--network", choices=sorted(NETWORK_PAIRS), default="mlp", help="the networks of every variant")
    p.add_argument("--channels", type=int, default=32, help="--network conv: the first layer's width")
    p.add_argument(
        "--estimators",
        type=split_specs,
        default=[],
        help='also time these estimators recorded and unrecorded, e.g. "iwae(k=5),dreg(k=5)"',
    )
    return p.parse_args(argv)


def summary(result: dict) -> str:
    machine = result["machine"]
    lines = [f"{machine['cpu']} | {machine['device']} | threads {machine['threads']} | {result['network']}"]
    for b, r in result["batches"].items():
        lines.append(f"batch {b}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in r["ms_per_step"].items()))
        lines.append(
            f"  project/torch {r['ratio_project_to_torch']:.3f} (paired {r['paired_ratio_project_to_torch']:.3f}), "
            f"pyro/torch {r['ratio_pyro_to_torch']:.3f} (paired {r['paired_ratio_pyro_to_torch']:.3f}), "
            f"project path: {r['project_path']}{' (recorded)' if r['project_recorded'] else ''}, "
            f"unrecorded/torch {r['ratio_project_unrecorded_to_torch']:.3f}"
        )
        lines.append(
            f"  CPU time: project/torch {r['cpu_ratio_project_to_torch']:.3f}, pyro/torch "
            f"{r['cpu_ratio_pyro_to_torch']:.3f}, "
            f"foreach project/torch {r['cpu_ratio_project_foreach_to_torch_foreach']:.3f}"
        )
        for spec, e in r["estimators"].items():
            lines.append(
                f"  {spec}: {e['ms_per_step']:.3f} ms recorded ({e['recorded']}), "
                f"{e['ms_per_step_unrecorded']:.3f} ms unrecorded: ratio {e['ratio_recorded_to_unrecorded']:.3f}"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args, summary)


if __name__ == "__main__":
    main()
