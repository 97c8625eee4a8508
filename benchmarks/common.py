"""Shared pieces of the benchmark scripts: machine description, data, the reference models, timing.

Timing is interleaved: every round runs each variant once (a block of steps, in rotating order),
so load from other processes hits all variants alike; medians over rounds are reported, and
per-round ratios as a second, drift-robust estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

from pyro_vae import data
from pyro_vae.networks import MIN_SCALE, mlp
from pyro_vae.optim import fused_supported

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = torch.backends.cuda.matmul.allow_tf32
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    return info


def resolve_device(name: str) -> torch.device:
    """``data.resolve_device`` (the project's one device reader), its error as the script's exit message."""
    try:
        return data.resolve_device(name)
    except ValueError as err:
        raise SystemExit(f"--device {name}: {err}") from None


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (device, network size, threads, TF32, data, JSON output);
    the script adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--hidden", type=lambda s: [int(h) for h in s.split(",")], default=[400])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p


def setup(args) -> torch.device:
    """The device of ``--device``, with ``--threads`` and ``--tf32`` applied."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def report(result: dict, args, summary: Callable[[dict], str]) -> None:
    """``result`` as JSON with ``--json``, else the human-readable ``summary(result)``."""
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(summary(result))


def mnist_images(
    device: torch.device, data_dir: str | None = None, split: str = "train", n: int | None = None
) -> tuple[torch.Tensor, str]:
    """MNIST images of ``split`` (all 60000 training or 10000 test images, grey levels in [0, 1],
    flattened) on ``device``, the first ``n`` if given; random binary data of the same shape when
    the data is not found. Returns (x, description)."""
    root = Path(data_dir) if data_dir else REPO.parent / "shared" / "data"
    try:
        x = getattr(data.load_dataset("mnist", root=root, device=device, val_size=0), split)
        what = f"MNIST {split} (grey levels, all {len(x)}), {root}"
    except (data.DatasetNotFoundError, FileNotFoundError, OSError):
        g = torch.Generator().manual_seed(0)
        size = 60000 if split == "train" else 10000
        x = (torch.rand(size, 784, generator=g) < 0.13).float().to(device)
        what = f"random binary {size} x 784 (MNIST not found)"
    x = x.reshape(x.shape[0], -1)
    return (x[:n] if n else x), what


class ReferenceVAE(torch.nn.Module):
    """The hand-written PyTorch VAE: the same networks as ``pyro_vae.networks`` (encoder MLP to
    (loc, softplus scale + MIN_SCALE), decoder MLP to Bernoulli logits), BCE on logits and the
    analytic Gaussian KL (Kingma & Welling 2014, Appendix B)."""

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden=(400,), act: str = "softplus") -> None:
        super().__init__()
        self.z_dim = z_dim
        self.enc = mlp(x_dim, hidden, 2 * z_dim, act)
        self.dec = mlp(z_dim, list(reversed(hidden)), x_dim, act)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        loc, raw = self.enc(x).split(self.z_dim, -1)
        scale = F.softplus(raw) + MIN_SCALE
        z = loc + scale * torch.randn_like(loc)
        rec = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        kl = 0.5 * (scale.square() + loc.square() - 1.0 - 2.0 * scale.log()).sum()
        return rec + kl


class ReferenceConvVAE(ReferenceVAE):
    """The hand-written PyTorch conv VAE on 1x28x28 images: the architecture of ``conv(channels=c, depth=2,
    kernel=4, activation='relu')`` both ways written out in plain ``nn`` layers (no pyro_vae code), with
    the same loss as :class:`ReferenceVAE` (BCE on logits, analytic KL).

    Encoder: Conv(1, c, 4, s2, p1) ReLU Conv(c, 2c, 4, s2, p1) ReLU, flatten 2c x 7 x 7, Linear to (loc, raw scale).
    Decoder: Linear(z, 2c x 7 x 7) ReLU, ConvT(2c, c, 4, s2, p1) ReLU ConvT(c, c, 4, s2, p1) ReLU, 1x1 Conv(c, 1).
    """

    def __init__(self, z_dim: int = 50, channels: int = 32) -> None:
        torch.nn.Module.__init__(self)
        nn, c = torch.nn, channels
        self.z_dim = z_dim
        self.enc = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            *(nn.Conv2d(1, c, 4, 2, 1), nn.ReLU(), nn.Conv2d(c, 2 * c, 4, 2, 1), nn.ReLU()),
            nn.Flatten(),
            nn.Linear(2 * c * 49, 2 * z_dim),
        )
        self.dec = nn.Sequential(
            nn.Linear(z_dim, 2 * c * 49),
            nn.ReLU(),
            nn.Unflatten(1, (2 * c, 7, 7)),
            *(nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(c, c, 4, 2, 1), nn.ReLU()),
            nn.Conv2d(c, 1, 1),
            nn.Flatten(),
        )


def reference_step(model: ReferenceVAE, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], torch.Tensor]:
    def step(x: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def reference_optimizer(params, lr: float, kind: str = "default") -> torch.optim.Optimizer:
    """``torch.optim.Adam`` with ``foreach=True``, ``fused=True``, or (``"default"``) the implementation
    that pyro_vae's default ``adam`` picks for these parameters (fused where torch has it), so that
    the reference and the project step run the same optimizer."""
    params = list(params)
    if kind == "default":
        kind = "fused" if fused_supported(params) else "foreach"
    if kind not in ("foreach", "fused"):
        raise ValueError(f"kind must be 'default', 'foreach' or 'fused', got {kind!r}")
    return torch.optim.Adam(params, lr=lr, **{kind: True})


class ParamStoreSlot:
    """A private Pyro param store for one benchmark variant: entering swaps it in (pointer swaps,
    outside the timed region), so variants that register modules under the same names do not share
    or overwrite each other's parameters."""

    def __init__(self) -> None:
        self.state = ({}, {}, {})

    def __enter__(self):
        store = pyro.get_param_store()
        self.saved = (store._params, store._param_to_name, store._constraints)
        store._params, store._param_to_name, store._constraints = self.state
        return self

    def __exit__(self, *exc) -> None:
        store = pyro.get_param_store()
        self.state = (store._params, store._param_to_name, store._constraints)
        store._params, store._param_to_name, store._constraints = self.saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotations(names: list[str], repeats: int) -> Iterator[list[str]]:
    """The order of each of ``repeats`` rounds: ``names`` rotated by the round's index, so that no
    variant always runs first (or right after the same other one)."""
    for r in range(repeats):
        yield names[r % len(names) :] + names[: r % len(names)]


def interleaved(
    variants: dict[str, Callable[[int], object]],
    slots: dict[str, ParamStoreSlot],
    device: torch.device,
    repeats: int,
    block: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Seconds per call of ``fn(i)`` for each variant: ``warmup`` untimed calls each, then
    ``repeats`` rounds; in each round every variant (rotating order) runs ``block`` calls.

    Returns wall-clock times under each name and this process's CPU time under ``name + ":cpu"``
    (less sensitive to other processes on a shared machine; on CUDA it is the host's work only)."""
    names = list(variants)
    for name in names:
        with slots[name]:
            for i in range(warmup):
                variants[name](i)
        sync(device)
    times: dict[str, list[float]] = {key: [] for name in names for key in (name, name + ":cpu")}
    counter = warmup
    for order in rotations(names, repeats):
        for name in order:
            with slots[name]:
                sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                for i in range(block):
                    variants[name](counter + i)
                sync(device)
                times[name].append((time.perf_counter() - start) / block)
                times[name + ":cpu"].append((time.process_time() - cpu_start) / block)
        counter += block
    return times


def summarize(times: dict[str, list[float]], base: str, scale: float = 1e3) -> dict:
    """Median (and quartiles) per variant in ms and the median of per-round ratios to ``base``
    (``name:cpu`` entries are compared with ``base:cpu``)."""
    out = {}
    for name, ts in times.items():
        ref = times[base + ":cpu"] if name.endswith(":cpu") else times[base]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {"median": statistics.median(ts) * scale, "q1": q[0] * scale, "q3": q[2] * scale}
        out[name]["paired_ratio_to_" + base] = statistics.median(t / b for t, b in zip(ts, ref, strict=True))
    return out
