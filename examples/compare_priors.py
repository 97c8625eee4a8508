"""Train one VAE per prior (and the IAF guide) on static MNIST and compare them on the same test images.

Only the ``model.prior`` or ``model.guide`` line of configs/mnist_static.toml changes between runs
(784-200-200-50 tanh, He initialization, Bernoulli likelihood, Adam 1e-3, batch 100): the same
seed, data, budget and KL warm-up for every run. Each run is evaluated with the same importance
sampler on the same test images (``pyro_vae.evaluate.log_likelihood``, k samples, best epoch by
validation ELBO), so the paired differences to the N(0, I) prior are far more precise than
either NLL. Tomczak & Welling (2018) report test NLLs of about 85-86 nats for a one-layer VampPrior
VAE on static MNIST (a few nats more with the standard prior), after up to 2000 epochs.

    python examples/compare_priors.py --epochs 30 --warmup-epochs 10 --out runs/priors30
    python examples/compare_priors.py --variants normal,vamp --epochs 5
    python examples/compare_priors.py --smoke                 # seconds: 1 epoch, 100 images, k = 10

A run folder that already holds a finished run of the same config is reused, not retrained, and
per-image NLLs are cached in it (``nll_per_image_k<K>_test<N>.pt``), so re-running the script
only redoes what is missing. Writes ``priors.json``, ``priors.md``, ``val_elbo.png`` and
``samples.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure  # drawn without pyplot: no backend, no window

from pyro_vae.checks import load_config
from pyro_vae.config import config_to_dict
from pyro_vae.evaluate import log_likelihood
from pyro_vae.runs import load_run, read_metrics
from pyro_vae.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_static.toml"
# name -> the one line that differs from the config.
VARIANTS = {
    "normal": [],
    "mixture": ["model.prior=mixture(components=10)"],
    "vamp": ["model.prior=vamp(components=500)"],
    "flow": ["model.prior=flow(kind='affine_autoregressive', layers=2)"],
    "iaf": ["model.guide=iaf(flows=2)"],
}
SMOKE = ["data.subset=100", "train.batch_size=50", "train.eval_batch_size=100", "train.plots=false"]
# Keys that say where and how a run executes, not what it computes: they may differ on reuse
# (train.record changes the speed of a step, not one number of the run: tests/test_train.py).
NOT_COMPARED = {("train", "device"), ("data", "data_dir"), ("train", "plots"), ("train", "record")}


def _comparable(cfg) -> dict:
    d = config_to_dict(cfg)
    return {s: {k: v for k, v in keys.items() if (s, k) not in NOT_COMPARED} for s, keys in d.items()}


def train_or_reuse(cfg, run_dir: Path, device, data_dir) -> str:
    """Train ``cfg`` into ``run_dir``, or reuse a finished run there of the very same config."""
    if (run_dir / "evaluation.json").exists():
        saved, wanted = _comparable(load_config(run_dir / "config.toml")), _comparable(cfg)
        differ = [f"{s}.{k}" for s in wanted for k in wanted[s] if saved.get(s, {}).get(k) != wanted[s][k]]
        if differ:
            raise SystemExit(
                f"{run_dir} holds a run of another config ({', '.join(differ)} differ); "
                "choose another --out or remove it"
            )
        return "reused"
    train(cfg, run_dir, device=device, data_dir=data_dir)
    return "trained"


def per_image_nll(run_dir: Path, k: int, num_test: int, device, data_dir) -> torch.Tensor:
    """-log p(x) per test image (best weights, k importance samples, seed 0), cached in the run folder."""
    cache = run_dir / f"nll_per_image_k{k}_test{num_test}.pt"
    if cache.exists():
        return torch.load(cache)
    run = load_run(run_dir, device=device, data_dir=data_dir)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        nll = -log_likelihood(run.vae, run.dataset.test[:num_test], num_samples=k).double().cpu()
    torch.save(nll, cache)
    return nll


def summarize(name: str, run_dir: Path, nll: torch.Tensor, base: torch.Tensor | None) -> dict:
    metrics = read_metrics(run_dir)
    evaluated = [m for m in metrics if m["val_bound"] is not None]  # train.eval_every skips epochs
    best = max(evaluated, key=lambda m: m["val_bound"])
    n = len(nll)
    row = {
        "variant": name,
        "overrides": VARIANTS[name],
        "epochs": len(metrics),
        "best_epoch": best["epoch"],
        "val_elbo": best["val_elbo"],
        "test_elbo": best["test_elbo"],
        "test_nll": float(nll.mean()),
        "test_nll_se": float(nll.std()) / math.sqrt(n),
        "seconds_per_epoch": sum(m["seconds"] for m in metrics) / len(metrics),
        "val_elbo_curve": [[m["epoch"], m["val_elbo"]] for m in evaluated],
    }
    if base is not None:
        diff = nll - base
        row["nll_minus_normal"] = float(diff.mean())
        row["nll_minus_normal_se"] = float(diff.std()) / math.sqrt(n)
    return row


def table(rows: list[dict], k: int, num_test: int) -> str:
    lines = [
        f"| variant | overrides | best epoch | val ELBO | test ELBO (all) | test NLL (k={k}, first {num_test}) ± SE "
        "| NLL − normal (paired SE) | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paired = f"{r['nll_minus_normal']:+.2f} ± {r['nll_minus_normal_se']:.2f}" if "nll_minus_normal" in r else "—"
        overrides = ", ".join(f"`{o}`" for o in r["overrides"]) or "(the config)"
        lines.append(
            f"| {r['variant']} | {overrides} | {r['best_epoch']} | {r['val_elbo']:.2f} | {r['test_elbo']:.2f} "
            f"| {r['test_nll']:.2f} ± {r['test_nll_se']:.2f} | {paired} | {r['seconds_per_epoch']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def draw(rows: list[dict], runs: dict[str, Path], out: Path, device) -> None:
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for r in rows:
        epochs, values = zip(*r["val_elbo_curve"], strict=True)
        ax.plot(epochs, values, marker=".", label=r["variant"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO (nats)")
    ax.set_title("static MNIST: one line of the config changed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_elbo.png")

    per_row = 10
    fig = Figure(figsize=(per_row * 0.8, len(rows) * 1.0), dpi=120)
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        run = load_run(runs[r["variant"]], device=device, load_data=False)
        pyro.set_rng_seed(0)
        images = run.vae.sample(per_row).cpu().reshape(per_row, *run.image_shape[-2:])
        ax.imshow(torch.cat(list(images), dim=1), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(f"{r['variant']}: E[x|z], z ~ p(z)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "samples.png")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run")
    parser.add_argument("--warmup-epochs", type=int, default=10, help="KL warm-up epochs (the VampPrior needs it)")
    parser.add_argument("--nll-samples", type=int, default=5000, help="importance samples k for the NLL")
    parser.add_argument("--test-examples", type=int, default=500, help="test images for the NLL (10000: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--data-dir", help="data root (else $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)")
    parser.add_argument("--out", type=Path, help="folder for the runs (default runs/compare_priors-<time>)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    epochs, warmup = (1, 1) if args.smoke else (args.epochs, args.warmup_epochs)
    k, num_test = (10, 20) if args.smoke else (args.nll_samples, args.test_examples)
    out = args.out or Path("runs") / f"compare_priors-{time.strftime('%Y%m%d-%H%M%S')}"
    common = [*(SMOKE if args.smoke else []), f"train.epochs={epochs}", f"train.warmup_epochs={warmup}"]
    common += ["train.nll_samples=0"]

    runs, nlls = {}, {}
    for name in names:
        cfg = load_config(CONFIG, [*common, *args.set, *VARIANTS[name]])
        runs[name], device = out / name, args.device or cfg.train.device
        how = train_or_reuse(cfg, runs[name], args.device, args.data_dir)
        nlls[name] = per_image_nll(runs[name], k, num_test, device, args.data_dir)
        se = float(nlls[name].std()) / math.sqrt(len(nlls[name]))
        print(f"{name} ({how}): test NLL {float(nlls[name].mean()):.2f} ± {se:.2f}", flush=True)
    base = nlls.get("normal")  # paired differences against the N(0, I) prior, when it was run
    rows = [summarize(name, runs[name], nll, base if name != "normal" else None) for name, nll in nlls.items()]

    text = table(rows, k, len(next(iter(nlls.values()))))
    (out / "priors.md").write_text(text)
    (out / "priors.json").write_text(json.dumps(rows, indent=2))
    draw(rows, runs, out, device)
    print(text, end="")
    print(f"figures: {out / 'val_elbo.png'}, {out / 'samples.png'}")
    return rows


if __name__ == "__main__":
    main()
