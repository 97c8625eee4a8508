"""Watch the first few hundred SVI steps for posterior collapse: does z start to carry information?

Trains a VAE on static MNIST at a fixed KL weight beta and prints, every ``--every`` steps, on 500
training images: the reconstruction term E_q log p(x|z), KL(q || p) (one draw), the spread of the
posterior means across images (sd over images, averaged over z's dimensions) and the mean posterior
scale; for the VampPrior also the spread of q(z|u_k) over its pseudo-inputs. The *plateau* printed
first is the best any decoder that ignores z can score on those images (independent Bernoulli
pixels at their means): a run whose reconstruction stays there with KL near 0 has collapsed.

This is the measurement behind docs/families.md (the VampPrior needs an encoder that sees x at
initialization, and KL warm-up):

    python examples/posterior_collapse_probe.py --prior "vamp(components=500)" --init torch --beta 0.01
    python examples/posterior_collapse_probe.py --prior "vamp(components=500)" --init he --beta 0.01
    python examples/posterior_collapse_probe.py --prior "vamp(components=500)" --init he --beta 1
    python examples/posterior_collapse_probe.py --prior normal --init torch --beta 0.05
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import estimators
from pyro_vae.data import load_mnist_static, make_generator, resolve_data_root, resolve_device
from pyro_vae.evaluate import ignore_z_baseline
from pyro_vae.model import VAE
from pyro_vae.optim import build_optimizer
from pyro_vae.train.step import TrainStep


@torch.no_grad()
def probe(vae: VAE, x: torch.Tensor) -> dict[str, float]:
    """Reconstruction, KL, posterior-mean spread and scale on ``x`` (one draw z ~ q(z|x))."""
    q = vae.posterior(x)
    z = q.sample()
    loc, scale = vae.encode(x)
    row = {
        "reconstruction": float(vae.decode(z).log_prob(x).mean()),
        "kl": float((q.log_prob(z) - vae.prior_distribution().log_prob(z)).mean()),
        "posterior_mean_sd": float(loc.std(0).mean()),
        "posterior_scale": float(scale.mean()),
    }
    if hasattr(vae.prior, "pseudo_inputs"):
        loc_u, _ = vae.encode(vae.prior.pseudo_inputs)
        row["pseudo_input_mean_sd"] = float(loc_u.std(0).mean())
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default="vamp(components=500)", help="prior spec")
    parser.add_argument("--init", default="he", help="torch, glorot or he")
    parser.add_argument("--beta", type=float, default=0.01, help="fixed KL weight (> 0)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50, help="probe every N steps")
    parser.add_argument("--subset", type=int, default=10000, help="training images used")
    parser.add_argument("--hidden", default="200,200", help="hidden widths (the IWAE paper's network)")
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="data root (else $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="folder for probe.json")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    if not args.beta > 0:
        parser.error(f"--beta must be positive (poutine.scale), got {args.beta}")
    steps, subset = (20, 500) if args.smoke else (args.steps, args.subset)
    every = 10 if args.smoke else args.every
    device = resolve_device(args.device)

    x = load_mnist_static(resolve_data_root(args.data_dir)).train[:subset].float().reshape(-1, 784).to(device)
    scored = x[:500]
    pyro.set_rng_seed(args.seed)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    vae = VAE(z_dim=args.z_dim, hidden_dims=hidden, activation=args.activation, prior=args.prior, init=args.init)
    vae.to(device)
    step = TrainStep(vae, estimators.get("trace"), build_optimizer("adam", vae.parameters(), args.lr))
    generator = make_generator(args.seed, device)
    baseline = ignore_z_baseline(scored)
    print(f"plateau (best decoder that ignores z) on {len(scored)} images: {baseline:.2f} nats", flush=True)
    rows, start = [], time.perf_counter()
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            row = {"step": t, **probe(vae, scored), "seconds": time.perf_counter() - start}
            rows.append(row)
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        if t < steps:
            step(x[torch.randint(0, len(x), (args.batch_size,), generator=generator, device=device)], args.beta)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
