"""Seconds per full MNIST epoch, data handling included: hand-written PyTorch vs Pyro SVI vs pyro_vae.

    python benchmarks/epoch_time.py [--device cpu|cuda] [--batch 128] [--repeats 3] [--json] [--dataloader]

Every variant makes one pass over the 60k training images (grey levels, device resident) in a
fresh random order and reads its summed loss once at the end of the epoch:

- ``torch``: ``torch.randperm`` on the device, index, the hand-written step (benchmarks/common.py);
- ``pyro_svi``: the same batches through ``SVI.step`` (a float per step: Pyro's documented loop);
- ``project``: ``pyro_vae.data.batches`` (device-side permutation) and ``pyro_vae.train.step.TrainStep``
  with the ``trace`` estimator and the loop's Adam, losses summed on the device -- what
  ``pyro_vae.train.train`` runs per epoch;
- ``pyro_example`` (``--dataloader``): Pyro's ``examples/vae/vae.py`` style, a torchvision
  ``MNIST`` + ``DataLoader(shuffle=True)`` on the host, each batch copied to the device, ``SVI.step``.

Rounds are interleaved (each round runs one epoch of every variant, rotating the order); medians
over rounds and ratios to ``torch`` are reported, wall clock and process CPU time.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO,
    ParamStoreSlot,
    ReferenceVAE,
    interleaved,
    machine_info,
    mnist_images,
    parser,
    reference_optimizer,
    reference_step,
    report,
    setup,
)
from pyro_vae import estimators
from pyro_vae.data import batches
from pyro_vae.model import VAE
from pyro_vae.optim import build_optimizer
from pyro_vae.train.step import TrainStep

LR = 1e-3


def build(x: torch.Tensor, batch_size: int, args, device: torch.device) -> tuple[dict, TrainStep]:
    """(name -> fn() running one epoch and returning the mean loss per example (read once), the project's step)."""
    n, hidden = x.shape[0], tuple(args.hidden)
    variants = {}

    torch.manual_seed(0)
    ref = ReferenceVAE(784, args.z_dim, hidden).to(device)
    ref_step = reference_step(ref, reference_optimizer(ref.parameters(), LR, "default"))

    def torch_epoch():
        total = torch.zeros((), device=device)
        for idx in torch.randperm(n, device=device).split(batch_size):
            total += ref_step(x[idx])
        return float(total) / n

    variants["torch"] = torch_epoch

    torch.manual_seed(0)
    vae_b = VAE(z_dim=args.z_dim, hidden_dims=hidden).to(device)
    svi = SVI(vae_b.model, vae_b.guide, pyro.optim.Adam({"lr": LR}), loss=Trace_ELBO())

    def svi_epoch():
        total = 0.0
        for idx in torch.randperm(n, device=device).split(batch_size):
            total += svi.step(x[idx])
        return total / n

    variants["pyro_svi"] = svi_epoch

    torch.manual_seed(0)
    vae_c = VAE(z_dim=args.z_dim, hidden_dims=hidden).to(device)
    step = TrainStep(vae_c, estimators.get("trace"), build_optimizer("adam", vae_c.parameters(), LR))
    generator = torch.Generator(device=device).manual_seed(0)

    def project_epoch():
        total = torch.zeros((), device=device)
        for xb in batches(x, batch_size, generator):
            total += step(xb)
        return float(total) / n

    variants["project"] = project_epoch

    if args.dataloader:
        variants["pyro_example"] = pyro_example_epoch(args, batch_size, device)
    return variants, step


def pyro_example_epoch(args, batch_size: int, device: torch.device):
    """Pyro's examples/vae/vae.py loop: torchvision MNIST, ToTensor, a shuffling DataLoader, SVI."""
    from torchvision import datasets, transforms

    root = args.data_dir or str(REPO.parent / "shared" / "data")
    train_set = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
    if args.subset:
        train_set = torch.utils.data.Subset(train_set, range(args.subset))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    vae = VAE(z_dim=args.z_dim, hidden_dims=tuple(args.hidden)).to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": LR}), loss=Trace_ELBO())

    def epoch():
        total = 0.0
        for xb, _ in loader:
            total += svi.step(xb.to(device).reshape(-1, 784))
        return total / len(train_set)

    return epoch


def run(args) -> dict:
    device = setup(args)
    x, data = mnist_images(device, args.data_dir, n=args.subset)
    result = {"benchmark": "epoch_time", "data": data, "examples": x.shape[0], "machine": machine_info(device)}
    result["batches"] = {}
    for batch_size in args.batch:
        variants, step = build(x, batch_size, args, device)
        slots = {name: ParamStoreSlot() for name in variants}
        losses = {name: [] for name in variants}
        epochs = {name: (lambda i, f=f, out=losses[name]: out.append(f())) for name, f in variants.items()}
        # One untimed epoch each first (first-call checks, allocator, capture), then interleaved rounds.
        times = interleaved(epochs, slots, device, args.repeats, block=1, warmup=1)
        sec = {name: statistics.median(times[name]) for name in variants}
        csec = {name: statistics.median(times[name + ":cpu"]) for name in variants}
        entry = {
            "seconds_per_epoch": sec,
            "cpu_seconds_per_epoch": csec,
            "ratio_project_to_torch": sec["project"] / sec["torch"],
            "ratio_pyro_to_torch": sec["pyro_svi"] / sec["torch"],
            "cpu_ratio_project_to_torch": csec["project"] / csec["torch"],
            "cpu_ratio_pyro_to_torch": csec["pyro_svi"] / csec["torch"],
            "last_epoch_loss_per_example": {k: v[-1] for k, v in losses.items()},
            "project_path": step.path,
            "rounds": args.repeats,
        }
        if "pyro_example" in sec:
            entry["ratio_pyro_example_to_torch"] = sec["pyro_example"] / sec["torch"]
        result["batches"][str(batch_size)] = entry
    return result


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[128])
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (after one warm-up epoch)")
    p.add_argument("--subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--dataloader", action="store_true", help="add Pyro's examples/vae DataLoader loop")
    return p.parse_args(argv)


def summary(result: dict) -> str:
    lines = [f"{result['machine']['cpu']} | {result['machine']['device']} | {result['data']} ({result['examples']})"]
    for b, r in result["batches"].items():
        lines.append(f"batch {b}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds_per_epoch"].items()))
        lines.append(
            f"  project/torch {r['ratio_project_to_torch']:.3f} (CPU {r['cpu_ratio_project_to_torch']:.3f}), "
            f"pyro/torch {r['ratio_pyro_to_torch']:.3f} (CPU {r['cpu_ratio_pyro_to_torch']:.3f})"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args, summary)


if __name__ == "__main__":
    main()
