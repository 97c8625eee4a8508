"""How honest the importance-sampled NLL's standard errors are at small K: delta method vs jackknife.

    python benchmarks/se_small_k.py [--ratio 17] [--repeats 4000] [--seed 0]

Log-normal weights with E[w] = 1 and E[w^2]/E[w]^2 = ``ratio`` (what a guide narrower than the posterior
gives); for K = 10, 100, 1000, ``repeats`` independent estimates log (1/K) sum_k w_k. Prints JSON: the sd of
the estimates, their bias (E[log p-hat] - log p), the root-mean-square of each standard error
(``pyro_vae.evaluate.delta_method_se``, ``jackknife_se``), the ratio sd / rms SE (1 = honest, > 1 =
optimistic) and the median effective sample size. The table in docs/evaluation.md is its output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_vae.evaluate import delta_method_se, effective_sample_size, jackknife_se


def measure(k: int, ratio: float, repeats: int, seed: int) -> dict[str, float]:
    """The row of one K."""
    s2 = math.log(ratio)
    generator = torch.Generator().manual_seed(seed)
    log_w = torch.randn(k, repeats, generator=generator, dtype=torch.float64) * math.sqrt(s2) - s2 / 2
    estimates = log_w.logsumexp(0) - math.log(k)
    sd = float(estimates.std())
    row = {"k": k, "sd": sd, "bias": float(estimates.mean())}
    for name, se in (("delta", delta_method_se(log_w)), ("jackknife", jackknife_se(log_w))):
        rms = float(se.square().mean().sqrt())
        row[f"rms_se_{name}"], row[f"sd_over_se_{name}"] = rms, sd / rms
    row["median_ess"] = float(effective_sample_size(log_w).median())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=17.0, help="E[w^2]/E[w]^2 (default: 17)")
    parser.add_argument("--repeats", type=int, default=4000, help="independent estimates per K (default: 4000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [measure(k, args.ratio, args.repeats, args.seed) for k in (10, 100, 1000)]
    print(json.dumps({"ratio": args.ratio, "repeats": args.repeats, "seed": args.seed, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
