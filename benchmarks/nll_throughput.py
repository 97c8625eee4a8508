"""Throughput and peak memory of the importance-sampled NLL (k = 5000) on the MNIST test set.

    python benchmarks/nll_throughput.py [--device cpu|cuda] [--samples 5000] [--subset N] [--json]

Times ``pyro_vae.evaluate.log_likelihood(vae, x, num_samples=k)`` (Burda et al. 2015's estimator,
streamed over chunks of samples) on the first ``--subset`` test images (all 10 000 by default on
CUDA; 20 on CPU, where the full set takes hours) and reports examples x samples per second.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus
the memory allocated before the call: the evaluation's own working set. On CPU torch allocates
outside Python's tracemalloc, so the figure is the growth of the process's peak resident set
(``ru_maxrss``) during the call: a lower bound on the working set (zero when an earlier peak was
higher; the script evaluates before anything else big is allocated to keep it meaningful).

The network is untrained by default (throughput does not depend on the weights); ``--run DIR``
evaluates a trained run instead and also reports its NLL.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, mnist_images, parser, report, setup, sync
from pyro_vae import evaluate
from pyro_vae.model import VAE


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args) -> dict:
    device = setup(args)
    if args.run:
        from pyro_vae.runs import load_run

        loaded = load_run(args.run, device=str(device), data_dir=args.data_dir)
        vae, x, data = loaded.vae, loaded.dataset.test.reshape(len(loaded.dataset.test), -1), f"run {args.run}"
    else:
        torch.manual_seed(0)
        vae = VAE(z_dim=args.z_dim, hidden_dims=tuple(args.hidden), activation=args.activation).to(device)
        x, data = mnist_images(device, args.data_dir, split="test")
    subset = args.subset if args.subset is not None else (None if device.type == "cuda" else 20)
    x = x[:subset] if subset else x
    k = args.samples
    kwargs = {"chunk_size": args.chunk_size, "batch_size": args.batch_size}
    evaluate.log_likelihood(vae, x[:2], num_samples=min(k, 64), **kwargs)  # warm-up
    sync(device)
    times, cpu_times, nll = [], [], None
    rss_before = rss_peak_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(args.repeats):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        log_px = evaluate.log_likelihood(vae, x, num_samples=k, **kwargs)
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        nll = float(-log_px.mean())
    seconds = min(times)
    result = {
        "benchmark": "nll_throughput",
        "data": data,
        "examples": x.shape[0],
        "num_samples": k,
        "chunk_size": args.chunk_size
        or evaluate.default_chunk_size(vae, min(x.shape[0], args.batch_size or evaluate.DEFAULT_BATCH_SIZE)),
        "batch_size": args.batch_size or evaluate.DEFAULT_BATCH_SIZE,
        "seconds": seconds,
        "seconds_all": times,
        "cpu_seconds": min(cpu_times),
        "examples_x_samples_per_second": x.shape[0] * k / seconds,
        "projected_seconds_for_10k_test_images": seconds * 10000 / x.shape[0],
        "nll_nats": nll,
        "machine": machine_info(device),
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - base
        result["peak_memory_method"] = "torch.cuda.max_memory_allocated - memory_allocated before"
    else:
        result["peak_memory_bytes"] = rss_peak_bytes() - rss_before
        result["peak_memory_method"] = "growth of ru_maxrss (peak RSS) during the evaluation: a lower bound"
    return result


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=5000, help="importance samples k per example")
    p.add_argument("--subset", type=int, default=None, help="first N test images (default: all on CUDA, 20 on CPU)")
    p.add_argument("--chunk-size", type=int, default=None, help="samples per chunk (default: evaluate's choice)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: evaluate's choice)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--run", default=None, help="a run folder to evaluate instead of an untrained network")
    p.add_argument("--activation", default="softplus")
    return p.parse_args(argv)


def summary(r: dict) -> str:
    return (
        f"{r['examples']} examples x {r['num_samples']} samples in {r['seconds']:.2f} s: "
        f"{r['examples_x_samples_per_second']:.3g} examples*samples/s; 10k test images ~ "
        f"{r['projected_seconds_for_10k_test_images']:.0f} s; peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB "
        f"({r['peak_memory_method']})"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args, summary)


if __name__ == "__main__":
    main()
