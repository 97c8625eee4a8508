"""Imputation of missing pixels by a trained VAE conditioned on the observed ones (``pyro-vae impute``).

Mattei & Frellsen, "MIWAE: Deep Generative Modelling and Imputation of Incomplete Data Sets", ICML 2019.
Given x_obs (the pixels where the mask m is True) the model's conditional of the missing pixels is

    p(x_miss | x_obs) = integral p(x_miss | z) p(z | x_obs) dz,

and the guide q(z|x_obs) (MIWAE's encoder, or a plain VAE's on the zero-filled image) is an importance
proposal for p(z | x_obs). With z_1..z_K ~ q(z|x_obs) and the weights of the masked model

    w_k = p(x_obs, z_k) / q(z_k | x_obs),

read from the structure's Pyro programs (``traces.particle_traces``, ``traces.trace_log_density``: the
log-weight mechanism of the bounds and the NLL):

- **single imputation**, self-normalised importance sampling (SNIS):
  E[x_miss | x_obs] ~ sum_k w_k E[x_miss | z_k] / sum_k w_k (consistent as K grows, bias O(1/K));
- **multiple imputation**, sampling-importance-resampling (SIR): draw z from the particles with
  probabilities w_k / sum_j w_j, then x_miss ~ p(x_miss | z): approximately a draw of p(x_miss | x_obs),
  exact as K -> infinity (Rubin 1988; Mattei & Frellsen 2019);
- log p(x_obs) ~ log (1/K) sum_k w_k on the way, and the effective sample size (sum w)^2 / sum w^2.

The K particles are streamed in chunks (like ``pyro_vae.evaluate``): the SNIS sums are rescaled as the
running normaliser grows, and each SIR draw is kept by weighted reservoir sampling (a chunk of total weight
W_c replaces it with probability W_c / W_so_far, with one of its particles drawn in proportion to w_k),
which is the same multinomial draw over all K particles. Memory does not grow with K.

The imputation error on the missing pixels (:func:`imputation_errors`) is the mean squared error and, on
binary data, the binary cross-entropy of the SNIS probabilities and the accuracy at threshold 1/2, per
example (so that a standard error over examples can be given); :func:`observed_means` is the mean-imputation
baseline (each pixel's mean over its observed training values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae.data import spread_rows
from pyro_vae.evaluate import DEFAULT_BATCH_SIZE, chunks, default_chunk_size, evaluating, flat_on_device, progress_bar
from pyro_vae.traces import particle_traces, trace_log_density

# Importance samples per example when none is given (Mattei & Frellsen impute with K = 10 000).
DEFAULT_SAMPLES = 1000
# Examples and multiple imputations drawn in the figure.
FIGURE_ROWS = 8
FIGURE_DRAWS = 3
# Probabilities are clamped to [EPS, 1 - EPS] in the cross-entropy, so a confident mistake costs 16 nats, not infinity.
EPS = 1e-7


@dataclass
class Imputation:
    """What :func:`impute` returns for N examples of D pixels (every tensor in data units, on x's device).

    Attributes:
        mean: ``(N, D)``: x where observed, the SNIS estimate of E[x_miss | x_obs] elsewhere.
        draws: ``(S, N, D)``: x where observed, S SIR draws of x_miss elsewhere.
        log_px: ``(N,)``: log (1/K) sum_k w_k, the importance-sampled log p(x_obs).
        ess: ``(N,)``: the effective sample size (sum_k w_k)^2 / sum_k w_k^2, between 1 and K.
    """

    mean: torch.Tensor
    draws: torch.Tensor
    log_px: torch.Tensor
    ess: torch.Tensor


def check_imputable(vae) -> None:
    """A one-line ``ValueError`` unless the model's programs take a mask (``Structure.takes_mask``)."""
    if getattr(vae, "takes_mask", False):
        return
    from pyro_vae.structures import STRUCTURES

    can = [name for name in STRUCTURES.names() if getattr(STRUCTURES.factory(name), "takes_mask", False)]
    structure = type(getattr(vae, "structure", vae)).__name__
    raise ValueError(
        f"{structure} cannot be conditioned on the observed pixels of x (its programs take no mask); "
        f"imputation needs one of the structures {', '.join(can)}"
    )


class _Particles:
    """The running sums of one batch of examples over chunks of particles: log sum w, log sum w^2, the
    SNIS average of E[x|z] and the S reservoir draws of SIR (see the module docstring)."""

    def __init__(self, x: torch.Tensor, draws: int) -> None:
        batch = x.shape[0]
        self.log_w1 = torch.full((batch,), -math.inf, dtype=x.dtype, device=x.device)
        self.log_w2 = self.log_w1.clone()
        self.mean = torch.zeros_like(x)
        self.draws = x.new_zeros(draws, *x.shape)

    def add(self, log_w: torch.Tensor, means: torch.Tensor, samples: torch.Tensor | None) -> None:
        """Fold in a chunk: ``log_w`` ``(k, batch)``, ``means`` E[x|z_k] ``(k, batch, D)``, ``samples`` x ~ p(x|z_k)
        ``(S, k, batch, D)`` (None when S = 0)."""
        chunk_log_w = log_w.logsumexp(0)
        total = torch.logaddexp(self.log_w1, chunk_log_w)
        self.mean = self.mean * (self.log_w1 - total).exp()[:, None] + ((log_w - total).exp()[..., None] * means).sum(0)
        self.log_w2 = torch.logaddexp(self.log_w2, (2 * log_w).logsumexp(0))
        if samples is not None:
            self._resample(log_w, (chunk_log_w - total).exp(), samples)
        self.log_w1 = total

    def _resample(self, log_w: torch.Tensor, keep_chunk: torch.Tensor, samples: torch.Tensor) -> None:
        """Each reservoir draw takes a particle of this chunk with probability ``keep_chunk`` (its share of the
        weight so far), the particle drawn in proportion to its weight."""
        draws, _, batch, width = samples.shape
        replace = torch.rand(draws, batch, dtype=keep_chunk.dtype, device=keep_chunk.device) < keep_chunk
        index = torch.distributions.Categorical(logits=log_w.T).sample((draws,))  # (S, batch), into the chunk
        picked = samples.gather(1, index[:, None, :, None].expand(draws, 1, batch, width)).squeeze(1)
        self.draws = torch.where(replace[..., None], picked.to(self.draws.dtype), self.draws)


def weighted_particles(vae, x: torch.Tensor, mask: torch.Tensor, k: int):
    """``(log_w, pixels)`` for ``k`` draws z_k ~ q(z|x_obs) per example: log w = log p(x_obs, z) - log q(z|x_obs),
    shape ``(k, batch)``, from the structure's traces, and p(x|z_k) of every pixel, the distribution of the
    observed site (batch shape ``(k, batch)``)."""
    guide_trace, model_trace = particle_traces(vae, x, k, mask=mask)
    log_w = trace_log_density(model_trace) - trace_log_density(guide_trace)
    return log_w, model_trace.nodes[vae.observed_sites[0]]["fn"]


def _impute_batch(vae, x: torch.Tensor, mask: torch.Tensor, num_samples: int, draws: int, chunk: int) -> Imputation:
    likelihood = vae.likelihood
    sums = _Particles(x, draws)
    for start in range(0, num_samples, chunk):
        log_w, pixels = weighted_particles(vae, x, mask, min(chunk, num_samples - start))
        samples = likelihood.data_units(pixels.sample((draws,))) if draws else None
        sums.add(log_w, likelihood.expectation(pixels).to(x.dtype), samples)
    return Imputation(
        mean=torch.where(mask, x, sums.mean),
        draws=torch.where(mask, x, sums.draws),
        log_px=sums.log_w1 - math.log(num_samples),
        ess=(2 * sums.log_w1 - sums.log_w2).exp(),
    )


def impute(
    vae,
    x: torch.Tensor,
    mask: torch.Tensor,
    num_samples: int = DEFAULT_SAMPLES,
    draws: int = 0,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = False,
) -> Imputation:
    """Single (SNIS) and ``draws`` multiple (SIR) imputations of the pixels of ``x`` where ``mask`` is False.

    Args:
        vae: a trained model whose programs take a mask (``Structure.takes_mask``: ``miwae``, or a ``vae`` or
            ``two_layer`` trained on complete data, conditioned here on the observed pixels).
        x: ``(N, ...)`` data; its values at missing pixels are never read.
        mask: ``(N, D)`` bool, True on the observed pixels.
        num_samples: K, importance samples per example.
        draws: S, multiple imputations per example (0: none).
        chunk_size: particles drawn at once (``None``: as ``evaluate.log_likelihood``, divided among the draws).
        batch_size: examples at once (``None``: ``evaluate.DEFAULT_BATCH_SIZE``).
        progress: a tqdm bar over examples (``None``: only on a terminal).
    """
    check_imputable(vae)
    if num_samples < 1 or draws < 0:
        raise ValueError(f"need num_samples >= 1 and draws >= 0, got {num_samples} and {draws}")
    x = flat_on_device(vae, x)
    mask = mask.reshape(x.shape).to(device=x.device, dtype=torch.bool)
    batch_size = batch_size or min(x.shape[0], DEFAULT_BATCH_SIZE) or 1
    parts = []
    with evaluating(vae), progress_bar(x.shape[0], progress, f"imputing, K={num_samples}") as bar:
        for xb, db in chunks(x, {"mask": mask}, batch_size):
            chunk = chunk_size or max(1, default_chunk_size(vae, xb.shape[0]) // (1 + draws))
            parts.append(_impute_batch(vae, xb, db["mask"], num_samples, draws, chunk))
            if bar is not None:
                bar.update(xb.shape[0])
    return Imputation(
        mean=torch.cat([p.mean for p in parts]),
        draws=torch.cat([p.draws for p in parts], 1),
        log_px=torch.cat([p.log_px for p in parts]),
        ess=torch.cat([p.ess for p in parts]),
    )


# -- errors and the mean-imputation baseline ----------------------------------------------------------
def observed_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each pixel's mean over the examples where it is observed, shape ``(D,)``; a pixel never observed takes the
    mean of every observed value. The mean-imputation baseline, fitted on the training set."""
    x = x.reshape(x.shape[0], -1).double()
    mask = mask.reshape(x.shape).to(x.device)
    counts, sums = mask.sum(0), torch.where(mask, x, 0.0).sum(0)
    overall = sums.sum() / counts.sum().clamp_min(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), overall)


def mean_imputation(x: torch.Tensor, mask: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """x with each missing pixel replaced by its ``means`` entry (:func:`observed_means`)."""
    x = x.reshape(x.shape[0], -1)
    return torch.where(mask.to(x.device), x, means.to(device=x.device, dtype=x.dtype))


def imputation_errors(
    x: torch.Tensor, mask: torch.Tensor, imputed: torch.Tensor, binary: bool
) -> dict[str, torch.Tensor]:
    """Errors of ``imputed`` on the missing pixels of each example, name -> ``(N,)`` (NaN where none is missing):

    - ``mse``: mean over the missing pixels of (imputed - x)^2;
    - on ``binary`` data, with imputed values read as probabilities p of a 1: ``bce``, the mean of
      -[x log p + (1 - x) log(1 - p)] (p clamped to [1e-7, 1 - 1e-7]), and ``accuracy``, the share of missing
      pixels where (p > 1/2) equals x.
    """
    x = x.reshape(x.shape[0], -1).double()
    imputed = imputed.reshape(x.shape).to(x).double()
    missing = ~mask.reshape(x.shape).to(x.device)
    count = missing.sum(-1)

    def average(values: torch.Tensor) -> torch.Tensor:
        return torch.where(missing, values, 0.0).sum(-1) / count

    errors = {"mse": average((imputed - x).square())}
    if binary:
        p = imputed.clamp(EPS, 1 - EPS)
        errors["bce"] = average(-(x * p.log() + (1 - x) * (-p).log1p()))
        errors["accuracy"] = average(((imputed > 0.5) == (x > 0.5)).double())
    return errors


def summarize(errors: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """name -> mean over the examples with a missing pixel, and ``name_se`` -> its standard error sd / sqrt(n)."""
    summary: dict[str, float | None] = {}
    for name, values in errors.items():
        kept = values[~values.isnan()].double()
        summary[name] = float(kept.mean()) if len(kept) else None
        summary[f"{name}_se"] = float(kept.std() / math.sqrt(len(kept))) if len(kept) > 1 else None
    return summary


# -- figures and runs ----------------------------------------------------------------------------------
def imputation_figure(
    vae,
    x: torch.Tensor,
    mask: torch.Tensor,
    image_shape,
    path: str | Path,
    num_samples: int = DEFAULT_SAMPLES,
    rows: int = FIGURE_ROWS,
    draws: int = FIGURE_DRAWS,
) -> Path:
    """``imputations.png`` (``plots.imputations``) of ``rows`` evenly spaced examples (``data.spread_rows``: every
    class of a class-sorted test set): the input, the SNIS imputation, ``draws`` SIR draws and the truth."""
    from pyro_vae.plots import imputations  # matplotlib loads only when figures are drawn

    shown = spread_rows(x.shape[0], rows)
    x, mask = x[shown], mask[shown]
    done = impute(vae, x, mask, num_samples=num_samples, draws=draws)
    return imputations(x.reshape(done.mean.shape), mask, done.mean, done.draws, image_shape, path)


def impute_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    missing=None,
    num_samples: int = DEFAULT_SAMPLES,
    num: int | None = None,
    split: str = "test",
    draws: int = FIGURE_DRAWS,
    device: str = "auto",
    data_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Impute the missing pixels of a run's ``split`` (``num`` evenly spaced examples: ``data.spread_rows``); score
    them beside mean imputation.

    ``missing`` is the mask spec (``masks.MASKS``); ``None`` takes the run's ``data.missing`` (and its very
    masks), and a run trained without one needs it. The baseline's means are fitted on the training set as the
    model saw it: under the run's training masks, or complete for a run trained on complete data. ``out``: the
    figure (``imputations.png`` of the first examples). ``seed`` seeds torch and Pyro first. Returns a
    JSON-ready dict: ``model`` and ``mean_imputation`` (``summarize``'d :func:`imputation_errors`),
    ``num_examples`` (those with a missing pixel), ``samples`` (K), ``missing``, ``nll_observed`` (the mean of
    -log p-hat(x_obs)), ``ess`` (its mean effective sample size), ``split``, ``data_variant``, ``run``, ``figure``.
    """
    from pyro_vae.fields import missing_mask
    from pyro_vae.runs import load_run  # runs -> evaluate; importing it at the top would be circular for structures

    run = load_run(run_dir, device=device, data_dir=data_dir)
    check_imputable(run.vae)
    spec = run.config.data.missing if missing is None else missing
    if spec is None:
        raise ValueError(
            f"run {run_dir} was trained without data.missing: say which pixels are missing with --missing SPEC, "
            "e.g. --missing 'mcar(rate=0.5)' or --missing 'squares(size=14)'"
        )
    dataset = run.dataset
    x, _ = dataset.split(split)
    if x.shape[0] == 0:
        raise ValueError(f"{dataset.name} has no {split} examples")
    fields = dataset.fields.get("mask", {})
    mask = fields[split] if missing is None else missing_mask(dataset, split, spec, run.config.train.seed, "--missing")
    rows = spread_rows(x.shape[0], num)
    x, mask = x[rows], mask[rows]
    train_mask = fields.get("train", torch.ones_like(dataset.train, dtype=torch.bool))
    pyro.set_rng_seed(seed)
    done = impute(run.vae, x, mask, num_samples=num_samples, progress=progress)
    binary = bool(dataset.is_binary)
    baseline = mean_imputation(x, mask, observed_means(dataset.train, train_mask))
    result: dict[str, Any] = {
        "run": str(run_dir),
        "data_variant": dataset.name,
        "split": split,
        "missing": spec,
        "samples": num_samples,
        "num_examples": int((~mask).any(-1).sum()),
        "model": summarize(imputation_errors(x, mask, done.mean, binary)),
        "mean_imputation": summarize(imputation_errors(x, mask, baseline, binary)),
        "nll_observed": float(-done.log_px.double().mean()),
        "ess": float(done.ess.double().mean()),
    }
    if out is not None:
        result["figure"] = str(imputation_figure(run.vae, x, mask, dataset.image_shape, out, num_samples, draws=draws))
    return result
