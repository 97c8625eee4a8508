"""How fast can one AIS gradient evaluation be on this machine? pyro_vae's against hand-written PyTorch.

    python -m benchmarks.ais_floor [--rows 1600] [--repeats 30] [--compile] [--json]

One HMC leapfrog step of AIS (``pyro_vae.ais``) needs d/dz [log p(z) + b log p(x|z)] for every chain:
the decoder forward, the Bernoulli log-density, and the backward pass to z (not to the weights). This
times that one evaluation on ``--rows`` rows (examples x chains) of the IWAE paper's decoder
(50-200-200-784 tanh, untrained: the cost does not depend on the weights) in six ways, each with
float32 products at full precision (``ieee``) and on bfloat16 inputs (``bf16``, oneDNN:
``torch.backends.mkldnn.matmul.fp32_precision``; ``tf32`` on CUDA):

- ``pyro_vae``: ``AnnealingPath.gradient`` with the Pyro programs interpreted on every call (``record=False``);
- ``recorded``: the same recorded once as a graph of ATen operations and replayed (the last leapfrog
  step of a transition at full precision, where the values are needed too);
- ``force``: the recorded gradient alone, without the values log p(z) and log p(x|z) (every other
  leapfrog step: the likelihood's density drops out of the graph, only its backward remains);
- ``eager``: the same arithmetic written by hand in PyTorch, torch's ``binary_cross_entropy_with_logits``;
- ``compiled`` (``--compile``): that function recorded with ``make_fx`` and compiled by ``torch.compile``
  (inductor fuses the elementwise work into a few C++ loops; needs a C++ compiler, about a minute);
- ``products``: the six matrix products alone (three forward, three backward to z), the floor no
  implementation goes below.

Each is reported in ms per evaluation and as the minutes it implies for Wu et al.'s protocol on 1000
test images: 1000 temperatures x (L + 1 = 11) evaluations x 16 chains x 1000 images = 1.76e8 row
evaluations, scaled linearly from ``--rows`` (on a CPU the rows are already enough to fill the cores).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, parser, report, setup, sync
from pyro_vae.ais import AnnealingPath, _annealing, matmul_precision
from pyro_vae.model import VAE

PROTOCOL_ROW_EVALUATIONS = 1000 * 11 * 16 * 1000  # temperatures x (L + 1) x chains x images
PRECISIONS = {"cpu": ("ieee", "bf16"), "cuda": ("ieee", "tf32")}  # full float32, and the fast one


def hand_written(vae: VAE, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """(log p(z), log p(x|z), d/dz [log p(z) + b log p(x|z)]) for a standard-normal prior and a Bernoulli
    decoder, in plain PyTorch on the decoder's own layers (constants of log p(z) dropped: no effect on
    the gradient)."""
    layers = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]

    def gradient(z: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            h = z
            for layer in layers[:-1]:
                h = torch.tanh(layer(h))
            logits = layers[-1](h)
            log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
            log_prior = -0.5 * z.square().sum(-1)
            (grad,) = torch.autograd.grad((log_prior + beta * log_lik).sum(), z)
        return log_prior.detach(), log_lik.detach(), grad

    return gradient


def products(vae: VAE, rows: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The decoder's matrix products alone: forward, then backward to the input (no weight gradients)."""
    weights = [m.weight.detach() for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)]
    upstream = torch.randn(rows, weights[-1].shape[0], device=weights[-1].device)

    def run(z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        h = z.reshape(rows, -1)
        for w in weights:
            h = h @ w.T
        g = upstream
        for w in reversed(weights):
            g = g @ w
        return g

    return run


def compiled(function: Callable, z: torch.Tensor, beta: torch.Tensor) -> Callable:
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(function, tracing_mode="fake", _allow_non_fake_inputs=True)(z, beta)
    return torch.compile(graph, dynamic=False)


def time_ms(function: Callable, z: torch.Tensor, beta: torch.Tensor, repeats: int) -> float:
    """Median over ``repeats`` calls, after two warm-up calls (the first of a compiled function compiles)."""
    for _ in range(2):
        function(z, beta)
    times = []
    for _ in range(repeats):
        sync(z.device)
        start = time.perf_counter()
        function(z, beta)
        sync(z.device)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def run(args) -> dict:
    device = setup(args)
    torch.manual_seed(0)
    vae = VAE(z_dim=args.z_dim, hidden_dims=tuple(args.hidden), activation="tanh").to(device)
    chains = 16
    x = (torch.rand(args.rows // chains, vae.x_dim, device=device) < 0.3).float()
    rows = chains * x.shape[0]
    ms: dict[str, dict[str, float]] = {}
    with _annealing(vae):
        path = AnnealingPath(vae, x, chains, "prior", {})
        z, beta = path.draw(), torch.tensor(0.5, device=device)
        recorded = AnnealingPath(vae, x, chains, "prior", {}, layout=path.layout)
        if not recorded.record(z, beta):
            raise RuntimeError(f"AIS could not record this model: {recorded.fallback_reason}")
        ways = {
            "pyro_vae": path.gradient,
            "recorded": recorded.gradient,
            "force": recorded.force,
            "eager": hand_written(vae, x),
            "products": products(vae, rows),
        }
        if args.compile:
            with matmul_precision(device, "ieee"):
                ways["compiled"] = compiled(ways["eager"], z, beta)
        for name, function in ways.items():
            for precision in PRECISIONS[device.type]:
                with matmul_precision(device, precision):
                    ms.setdefault(name, {})[precision] = time_ms(function, z, beta, args.repeats)
    minutes = {name: {p: t / rows * PROTOCOL_ROW_EVALUATIONS / 60000 for p, t in by.items()} for name, by in ms.items()}
    reference = ms["pyro_vae"]["ieee"]
    return {
        "benchmark": "ais_floor",
        "network": f"decoder {args.z_dim}-{'-'.join(map(str, args.hidden))}-784 tanh, Bernoulli, untrained",
        "rows": rows,
        "repeats": args.repeats,
        "ms_per_gradient_evaluation": ms,
        "speedup_over_pyro_vae_ieee": {name: {p: reference / t for p, t in by.items()} for name, by in ms.items()},
        "protocol_minutes": minutes,
        "protocol": "1000 temperatures x 11 gradient evaluations x 16 chains x 1000 images, linear in rows",
        "machine": machine_info(device),
    }


def parse_args(argv=None):
    p = parser(__doc__)
    p.set_defaults(hidden=[200, 200])
    p.add_argument("--rows", type=int, default=1600, help="rows per evaluation: 16 chains x rows/16 images")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd hand-written gradient")
    return p.parse_args(argv)


def summary(r: dict) -> str:
    lines = [f"one AIS gradient evaluation of {r['rows']} rows (median ms; minutes for the protocol):"]
    for name, by in r["ms_per_gradient_evaluation"].items():
        cells = ", ".join(f"{p} {t:.2f} ms ({r['protocol_minutes'][name][p]:.1f} min)" for p, t in by.items())
        lines.append(f"  {name:9s} {cells}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args, summary)


if __name__ == "__main__":
    main()
