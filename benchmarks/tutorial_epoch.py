"""Seconds per MNIST epoch: a plain-PyTorch loop vs pyro_vae's training step, interleaved in one run.

The network is Pyro's VAE tutorial (configs/mnist.toml): 784-400-50 with softplus, a diagonal
Gaussian q(z|x) with ``scale = softplus(raw) + 1e-4`` (as pyro_vae.networks), a Bernoulli decoder
on logits, batch 256, Adam with lr 1e-3, MNIST grey levels (60k training images).

Variants, each a full pass over the training set (one epoch):

- ``torch``: a hand-written loop, no Pyro: loss = BCE-with-logits summed + analytic KL
  (Kingma & Welling 2014, appendix B), backward, Adam step.
- ``trace``: pyro_vae's per-epoch path as ``pyro_vae.train.train`` runs it: ``TrainStep`` with the
  ``trace`` estimator (Pyro's Trace_ELBO, Monte Carlo KL), Pyro validation off, losses summed on the
  device and read once at the end of the epoch. This is what ``configs/mnist.toml`` trains with.
- ``closed_form``: the same path with the ``closed_form`` estimator (analytic KL, no Pyro traces):
  the same mathematics as ``torch``, so ``closed_form / torch`` is the cost of the library's
  abstractions and ``trace / closed_form`` the cost of Pyro's tracing.

Each round runs every variant for one epoch in a rotated order (so that drifting machine load hits
all of them alike); the report gives per-variant medians over rounds and the ratios of medians to
``torch``. Only the training loop is timed, not evaluation, checkpoints or figures. Every variant
keeps its own model and optimizer across rounds (later rounds are warm epochs of a real run).

    python benchmarks/tutorial_epoch.py --data-dir /work/shared/data --rounds 3 --out runs/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae import estimators
from pyro_vae.data import batches, load_dataset
from pyro_vae.model import VAE
from pyro_vae.networks import MIN_SCALE
from pyro_vae.step import TrainStep

X_DIM, Z_DIM, HIDDEN, BATCH, LR = 784, 50, 400, 256, 1e-3


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class TorchVAE(nn.Module):
    """The tutorial's network in plain torch, same layer shapes and parameter count as pyro_vae.VAE."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 2 * Z_DIM))
        self.dec = nn.Sequential(nn.Linear(Z_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, X_DIM))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Minus the ELBO summed over the batch: BCE + KL(N(loc, scale^2) || N(0, 1)), one z sample."""
        loc, raw = self.enc(x).chunk(2, dim=-1)
        scale = F.softplus(raw) + MIN_SCALE
        z = loc + scale * torch.randn_like(loc)
        rec = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        kl = 0.5 * (loc.square() + scale.square() - 1.0).sum() - scale.log().sum()
        return rec + kl


def torch_variant(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    torch.manual_seed(seed)
    net = TorchVAE()
    opt = torch.optim.Adam(net.parameters(), lr=LR)

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = net.loss(x)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def pyro_vae_variant(estimator: str, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    pyro.set_rng_seed(seed)
    vae = VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden_dims=(HIDDEN,), activation="softplus")
    step_fn = TrainStep(vae, estimators.get(estimator), torch.optim.Adam(vae.parameters(), lr=LR))
    return lambda x: step_fn(x, 1.0)


def run_epoch(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, generator: torch.Generator) -> dict:
    """One epoch as pyro_vae.train does it: device-side permuted batches, one host read at the end."""
    start = time.perf_counter()
    loss_sum = torch.zeros(())
    with pyro.validation_enabled(False):
        for xb in batches(x, BATCH, generator):
            loss_sum += step(xb)
    mean_loss = loss_sum.item() / len(x)
    return {"seconds": time.perf_counter() - start, "train_elbo": -mean_loss}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_VAE_DATA, else the cache)")
    parser.add_argument("--rounds", type=int, default=3, help="epochs per variant (interleaved)")
    parser.add_argument("--variants", default="torch,trace,closed_form", help="comma-separated subset")
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="use N training images (a partial epoch, for smoke runs or a loaded machine)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON report here as well")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    makers = {
        "torch": lambda: torch_variant(args.seed),
        "trace": lambda: pyro_vae_variant("trace", args.seed),
        "closed_form": lambda: pyro_vae_variant("closed_form", args.seed),
    }
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in makers]
    if unknown or not names:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(makers)}")
    load_before = os.getloadavg()
    x = load_dataset("mnist", root=args.data_dir, device="cpu", subset=args.subset, val_size=0).train
    steps = {name: makers[name]() for name in names}
    generators = {name: torch.Generator().manual_seed(args.seed) for name in names}
    epochs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            result = run_epoch(steps[name], x, generators[name])
            epochs[name].append({"round": r + 1, **result})
            print(f"round {r + 1} {name:12s} {result['seconds']:8.2f} s  train ELBO {result['train_elbo']:.2f}")
    medians = {name: statistics.median(e["seconds"] for e in epochs[name]) for name in names}
    # Per-round ratios pair epochs run seconds apart, so slow drift in the machine's load cancels.
    round_ratios = (
        {
            n: statistics.median(a["seconds"] / b["seconds"] for a, b in zip(epochs[n], epochs["torch"], strict=True))
            for n in names
        }
        if "torch" in epochs
        else None
    )
    report = {
        "benchmark": "tutorial_epoch",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # other processes share the CPU: the ratios (interleaved rounds) are the robust numbers
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version()},
        "train_images": len(x),
        "batch_size": BATCH,
        "rounds": args.rounds,
        "epochs": epochs,
        "median_seconds": medians,
        "steps_per_epoch": -(-len(x) // BATCH),
        "ratio_to_torch": {n: medians[n] / medians["torch"] for n in names} if "torch" in medians else None,
        "median_round_ratio_to_torch": round_ratios,
    }
    print(
        json.dumps(
            {k: report[k] for k in ("median_seconds", "ratio_to_torch", "median_round_ratio_to_torch")}, indent=2
        )
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
