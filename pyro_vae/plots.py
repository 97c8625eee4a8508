"""Figures of a trained VAE, as PNG files (matplotlib, Agg canvas, no pyplot state).

A leaf module: it imports nothing else from pyro_vae. A ``vae`` is used by duck typing --
``posterior(x)`` (q(z|x)), ``decoder(z)`` with ``likelihood.mean(params)`` (E[x|z] in data units),
``sample(n)``, ``z_dim`` -- and data are tensors ``(N, D)`` with an ``image_shape`` ``(C, H, W)``
(1x28x28 grey, 3x32x32 colour; ``None`` draws each example as a one-row strip).

Figures (Kingma & Welling 2014 show the manifold and latent-space figures):

- :func:`learning_curves`: train / validation / test ELBO against the epoch;
- :func:`reconstructions`: inputs over their reconstructions E[x | z = E_q[z]];
- :func:`sample_figure`: E[x|z] for z ~ p(z);
- :func:`latent_codes`: the posterior means of the test set coloured by label (the first two
  principal components when z_dim > 2);
- :func:`manifold`: for z_dim = 2, E[x|z] on a grid of standard-normal quantiles;
- :func:`interpolation`: decodings along straight lines between the codes of two test images;
- :func:`completions`: a conditional model's completions of partly given images (``complete(x, mask, n)``);
- :func:`imputations`: images with missing pixels, their single and multiple imputations and the truth
  (``pyro_vae.impute`` computes them);
- :func:`class_samples`, :func:`style_transfer`: a class-conditional model's (M2's) samples by class,
  and the style of test inputs decoded with every class (:func:`m2_figures`);
- :func:`score_histograms`: anomaly scores of an in- and an out-of-distribution set, one panel per
  score (``pyro-vae score --out``);
- :func:`write_all_figures`: all that apply, each isolated so one failure does not stop the others.

Every figure is a ``matplotlib.figure.Figure`` drawn on its own Agg canvas, never registered with
pyplot: nothing changes the user's backend and nothing is left open (it is freed with the object).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from pyro_vae.data import spread_rows

# metrics.jsonl keys drawn by learning_curves, with their legend labels.
CURVES = {"train_elbo": "train", "val_elbo": "validation", "test_elbo": "test"}
DPI = 100
# Points in the latent scatter: more only hide each other and slow the encoder.
MAX_POINTS = 5000


# -- drawing helpers -------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _param(vae) -> torch.Tensor:
    return next(vae.parameters())


def _decode_mean(vae, z: torch.Tensor) -> torch.Tensor:
    """E[x|z] in data units ([0, 1]), shape ``(..., x_dim)``."""
    return vae.likelihood.mean(vae.decoder(z))


def _codes(vae, x: torch.Tensor) -> torch.Tensor:
    """Posterior means E_q[z|x]; the average of 64 draws for guides without an analytic mean (flows)."""
    q = vae.posterior(x.to(_param(vae).device))
    try:
        return q.mean
    except NotImplementedError:
        return q.sample((64,)).mean(0)


def _images(x: torch.Tensor, image_shape: Sequence[int] | None) -> np.ndarray:
    """Flattened examples ``(N, D)`` -> images ``(N, H, W, C)`` in [0, 1]."""
    x = x.detach().reshape(x.shape[0], -1).float().cpu().clamp(0, 1)
    c, h, w = tuple(image_shape) if image_shape is not None else (1, 1, x.shape[1])
    if c * h * w != x.shape[1]:
        raise ValueError(f"image_shape {tuple(image_shape)} has {c * h * w} values, but examples have {x.shape[1]}")
    return x.reshape(-1, c, h, w).permute(0, 2, 3, 1).numpy()


def _grid(images: np.ndarray, ncol: int, pad: int = 1) -> np.ndarray:
    """Tile ``(N, H, W, C)`` images into rows of ``ncol`` with white padding."""
    n, h, w, c = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad) : (r + 1) * (h + pad), pad + col * (w + pad) : (col + 1) * (w + pad)] = image
    return grid


def _show(ax, grid: np.ndarray, title: str | None = None) -> None:
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def _image_figure(images: np.ndarray, ncol: int, path: str | Path, title: str | None = None) -> Path:
    grid = _grid(images, ncol)
    height, width = grid.shape[:2]
    scale = 8 / max(width, height)  # inches per grid pixel: the longer side is 8 inches (800 pixels)
    fig = _figure(max(2.0, width * scale), max(1.0, height * scale))
    _show(fig.add_subplot(), grid, title)
    return _save(fig, path)


# -- figures ---------------------------------------------------------------------------------------------
def learning_curves(metrics: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Train / validation / test ELBO (nats per example) against the epoch, from ``metrics.jsonl`` records.

    A key missing from some records (e.g. a test ELBO computed every few epochs) is drawn where
    present; records without ``epoch`` are numbered from 1. ``ValueError`` when no curve has a point.
    """
    records = list(metrics)
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    drawn = 0
    for key, label in CURVES.items():
        points = [
            (rec.get("epoch", i + 1), rec[key])
            for i, rec in enumerate(records)
            if isinstance(rec.get(key), (int, float)) and math.isfinite(rec[key])
        ]
        if points:
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
            drawn += 1
    if not drawn:
        raise ValueError(f"no learning curve to draw: the metrics have none of {', '.join(CURVES)}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ELBO (nats per example)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


@torch.no_grad()
def reconstructions(vae, x: torch.Tensor, image_shape: Sequence[int] | None, path: str | Path, num: int = 10) -> Path:
    """Inputs (top row) over their reconstructions E[x | z = E_q[z|x]] (bottom row), ``num`` of them, evenly
    spaced over ``x`` (``data.spread_rows``: every class of a class-sorted test set)."""
    x = x[spread_rows(x.shape[0], num)].to(_param(vae).device)
    recon = vae.reconstruct(x)
    images = _images(torch.cat([x.reshape(x.shape[0], -1), recon]), image_shape)
    return _image_figure(images, x.shape[0], path, "inputs (top) and reconstructions (bottom)")


@torch.no_grad()
def sample_figure(vae, image_shape: Sequence[int] | None, num: int, path: str | Path) -> Path:
    """E[x|z] for ``num`` draws z ~ p(z), in a square-ish grid (``pyro-vae sample``)."""
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    return _image_figure(_images(vae.sample(num), image_shape), math.ceil(math.sqrt(num)), path, "samples from p(z)")


def _pca2(z: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """The first two principal components of the codes, with axis labels giving their share of variance."""
    centered = z - z.mean(0)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    share = s.square() / s.square().sum().clamp_min(1e-30)
    return centered @ vh[:2].T, [f"PC{i + 1} ({100 * float(share[i]):.0f}% of variance)" for i in range(2)]


@torch.no_grad()
def latent_codes(vae, x: torch.Tensor, labels: torch.Tensor | None, path: str | Path) -> Path:
    """The posterior means E_q[z|x] of up to ``MAX_POINTS`` examples, coloured by label.

    z_dim = 2: the codes themselves; z_dim > 2: their first two principal components; z_dim = 1:
    the code against the label (or the example index).
    """
    x = x[:MAX_POINTS]
    z = _codes(vae, x).double().cpu()
    y = labels[: x.shape[0]].cpu().numpy() if labels is not None else None
    if z.shape[1] == 1:
        coords = torch.stack([z[:, 0], torch.as_tensor(y if y is not None else np.arange(len(z)), dtype=z.dtype)], 1)
        axes = ["z", "label" if y is not None else "example"]
    elif z.shape[1] == 2:
        coords, axes = z, ["z1", "z2"]
    else:
        coords, axes = _pca2(z)
    coords = coords.numpy()
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    classes = np.unique(y) if y is not None else []
    if y is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=4, alpha=0.6)
    elif len(classes) <= 10:
        for c in classes:
            keep = y == c
            ax.scatter(
                coords[keep, 0], coords[keep, 1], s=4, alpha=0.6, label=str(c), color=f"C{list(classes).index(c)}"
            )
        ax.legend(title="label", markerscale=3, fontsize="small", loc="best")
    else:
        points = ax.scatter(coords[:, 0], coords[:, 1], c=y, s=4, alpha=0.6, cmap="viridis")
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(f"posterior means of {len(coords)} examples (z_dim = {z.shape[1]})")
    return _save(fig, path)


@torch.no_grad()
def manifold(vae, image_shape: Sequence[int] | None, path: str | Path, n: int = 15) -> Path:
    """E[x|z] on an ``n`` x ``n`` grid of standard-normal quantiles (5% to 95%) of a 2-D latent space.

    Kingma & Welling (2014), Figure 4: the grid maps equal probability mass of N(0, I) to equal
    spacing, so it covers where the standard-normal prior puts its mass.
    """
    if vae.z_dim != 2:
        raise ValueError(f"the manifold figure needs z_dim = 2, this model has z_dim = {vae.z_dim}")
    param = _param(vae)
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n, dtype=torch.float64))
    rows, cols = torch.meshgrid(q.flip(0), q, indexing="ij")  # z2 grows upwards, z1 to the right
    z = torch.stack([cols.flatten(), rows.flatten()], -1).to(device=param.device, dtype=param.dtype)
    return _image_figure(_images(_decode_mean(vae, z), image_shape), n, path, "E[x|z] over the 2-D latent space")


@torch.no_grad()
def interpolation(
    vae, x: torch.Tensor, image_shape: Sequence[int] | None, path: str | Path, steps: int = 8, rows: int = 4
) -> Path:
    """Rows of decodings along z(t) = (1 - t) E_q[z|a] + t E_q[z|b], t in [0, 1], for pairs of examples (a, b).

    Each row starts with input a and ends with input b; row i pairs example i with example
    ``rows + i``.
    """
    rows = min(rows, x.shape[0] // 2)
    if rows < 1:
        raise ValueError(f"interpolation needs at least 2 examples, got {x.shape[0]}")
    x = x[: 2 * rows].to(_param(vae).device).reshape(2 * rows, -1)
    z = _codes(vae, x)
    t = torch.linspace(0, 1, steps, dtype=z.dtype, device=z.device)[:, None, None]
    path_z = (1 - t) * z[:rows] + t * z[rows:]  # (steps, rows, z_dim)
    decoded = _decode_mean(vae, path_z).transpose(0, 1)  # (rows, steps, x_dim)
    row_images = torch.cat([x[:rows, None], decoded.to(x.dtype), x[rows:, None]], 1)  # (rows, steps + 2, x_dim)
    images = _images(row_images.reshape(-1, x.shape[1]), image_shape)
    return _image_figure(images, steps + 2, path, "latent interpolation (ends: the inputs)")


# The shade of the pixels a conditional model predicts, in the input column of the completions figure.
UNSEEN_GREY = 0.5


@torch.no_grad()
def completions(
    model,
    x: torch.Tensor,
    input_mask: torch.Tensor,
    image_shape: Sequence[int] | None,
    path: str | Path,
    samples: int = 5,
    num: int = 8,
) -> Path:
    """One row per example: the input (given pixels, the rest grey), ``samples`` completions, the truth.

    ``model.complete(x, input_mask, samples)`` gives the completions, shape ``(samples, num, D)``: the
    given pixels of x with a prediction of the others pasted in (a CVAE: E[y|z] for z ~ p(z|x_in);
    a deterministic baseline: its one prediction, ``samples = 1``). Sohn et al. (2015), Figure 3.
    """
    num = min(num, x.shape[0])
    if num < 1:
        raise ValueError("completions need at least one example")
    shown = spread_rows(x.shape[0], num)
    x = x[shown].to(_param(model).device).reshape(num, -1)
    mask = input_mask[shown].to(x.device)
    filled = model.complete(x, mask, samples).to(x.dtype)  # (samples, num, D)
    given = torch.where(mask, x, torch.full_like(x, UNSEEN_GREY))
    rows = torch.cat([given[:, None], filled.transpose(0, 1), x[:, None]], 1)  # (num, samples + 2, D)
    title = f"input (grey: to predict), {filled.shape[0]} completion{'s' * (filled.shape[0] > 1)}, truth"
    return _image_figure(_images(rows.reshape(-1, x.shape[1]), image_shape), rows.shape[1], path, title)


# The colour of the missing pixels in the input column of the imputations figure (RGB).
MISSING_COLOUR = (0.9, 0.1, 0.1)


def imputations(
    x: torch.Tensor,
    mask: torch.Tensor,
    single: torch.Tensor,
    multiple: torch.Tensor,
    image_shape: Sequence[int] | None,
    path: str | Path,
) -> Path:
    """One row per example: the input with its missing pixels in :data:`MISSING_COLOUR`, the single
    imputation ``single`` ``(N, D)``, the multiple imputations ``multiple`` ``(S, N, D)``, and the truth ``x``.

    Grey images are drawn in RGB so that the missing pixels stand out.
    """
    n, d = x.shape[0], x[0].numel()
    if n < 1:
        raise ValueError("imputations need at least one example")
    x, mask = x.reshape(n, d).cpu(), mask.reshape(n, d).cpu()
    columns = [x, single.reshape(n, d).cpu(), *multiple.reshape(-1, n, d).cpu(), x]
    rows = torch.stack(columns, 1).reshape(-1, d)  # (n * columns, D), row by row
    images = _images(rows, image_shape)
    images = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images.copy()
    missing = _images((~mask).float(), image_shape).max(-1) > 0  # (n, H, W): a pixel with any channel missing
    images.reshape(n, len(columns), *images.shape[1:])[:, 0][missing] = MISSING_COLOUR
    title = f"input (red: missing), single imputation, {len(columns) - 3} multiple imputation(s), truth"
    return _image_figure(images, len(columns), path, title)


def _snr_axes(ax, snr: Mapping[tuple[str, str], Sequence[tuple]], groups: Sequence[str], ylabel: str) -> None:
    """Gradient SNR against k on log-log axes: one colour per estimator, one line style per group,
    ±2 SE bars where a point is ``(k, snr, se)`` with an SE, and two grey reference lines of slope
    +1/2 and -1/2 (the asymptotic rates of Rainforth et al. 2018 and Tucker et al. 2019) through the
    geometric mean of the SNRs at the smallest k."""
    colours = {label: f"C{i}" for i, label in enumerate(sorted({label for label, _ in snr}))}
    styles = dict(zip(groups, ("-", "--", ":", "-."), strict=False))
    all_ks = sorted({p[0] for points in snr.values() for p in points})
    for (label, group), points in snr.items():
        ks = [p[0] for p in points]
        values = [p[1] for p in points]
        errors = [2 * p[2] if len(p) > 2 and p[2] is not None else 0.0 for p in points]
        # a bar that would reach below zero is cut at a tenth of the value: a log axis has no zero
        lower = [min(e, 0.9 * v) for v, e in zip(values, errors, strict=True)]
        ax.errorbar(
            ks,
            values,
            yerr=[lower, errors],
            marker="o",
            markersize=4,
            capsize=2,
            color=colours[label],
            linestyle=styles.get(group, "-"),
            label=f"{label} · {group}",
        )
    if not snr:
        ax.text(0.5, 0.5, "no estimator with k", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log")
        ax.set_yscale("log")
        if len(all_ks) > 1:
            k0, k1 = all_ks[0], all_ks[-1]
            at_k0 = [p[1] for points in snr.values() for p in points if p[0] == k0 and p[1] > 0]
            anchor = math.exp(sum(math.log(v) for v in at_k0) / len(at_k0)) if at_k0 else 1.0
            for slope in (0.5, -0.5):
                ax.plot(
                    [k0, k1],
                    [anchor, anchor * (k1 / k0) ** slope],
                    color="0.6",
                    linewidth=1,
                    linestyle=(0, (4, 3)),
                    label=f"slope {slope:+.1f}".replace("0.5", "1/2"),
                )
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize="x-small")
    ax.set_xlabel("k (importance samples)")
    ax.set_ylabel(ylabel)


def estimator_comparison(
    bounds: Sequence[tuple[str, float, float]],
    snr: Mapping[tuple[str, str], Sequence[tuple]],
    groups: Sequence[str],
    path: str | Path,
    snr_label: str = "gradient SNR (mean over parameters)",
) -> Path:
    """Two panels: each estimator's bound with an error bar (``(label, mean, half_width)``), and
    gradient SNR against k on log-log axes (``(estimator, group) -> [(k, snr)]`` or ``[(k, snr, se)]``,
    drawn with ±2 SE bars and reference slopes ±1/2), one colour per estimator and one line style
    per parameter group (``groups`` fixes the styles' order)."""
    fig = _figure(12, 4.5)
    ax_bound, ax_snr = fig.subplots(1, 2)
    labels = [label for label, _, _ in bounds]
    ax_bound.errorbar([m for _, m, _ in bounds], range(len(bounds)), xerr=[e for _, _, e in bounds], fmt="o", capsize=3)
    ax_bound.set_yticks(range(len(bounds)), labels)
    ax_bound.invert_yaxis()
    ax_bound.set_xlabel("bound (nats per example), ±2 SE")
    ax_bound.set_title("bound per estimator")
    _snr_axes(ax_snr, snr, groups, snr_label)
    ax_snr.set_title("gradient signal-to-noise vs k")
    fig.tight_layout()
    return _save(fig, path)


def snr_against_k(
    panels: Mapping[str, Mapping[tuple[str, str], Sequence[tuple]]],
    groups: Sequence[str],
    path: str | Path,
    ylabel: str = "gradient SNR",
    columns: int | None = None,
) -> Path:
    """One log-log panel of gradient SNR against k per ``title -> {(estimator, group): [(k, snr, se)]}``,
    ``columns`` to a row (default: all in one row) on a shared y axis, each with ±2 SE bars and
    reference slopes ±1/2."""
    if not panels:
        raise ValueError("no panels to draw")
    columns = min(columns or len(panels), len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = _figure(4.6 * columns, 4.2 * rows)
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False)
    for i, (title, series) in enumerate(panels.items()):
        ax = axes[i // columns][i % columns]
        _snr_axes(ax, series, groups, ylabel if i % columns == 0 else "")
        ax.set_title(title, fontsize="medium")
    for i in range(len(panels), rows * columns):
        axes[i // columns][i % columns].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def score_histograms(
    panels: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    titles: Mapping[str, str] | None = None,
    caption: str | None = None,
    bins: int = 50,
) -> Path:
    """One panel per score (``name -> (scores in, scores out)``, arrays or tensors): the histograms of the
    in- and the out-of-distribution set as densities on shared bins, so their overlap is what the AUROC
    measures. ``titles`` replace the panels' titles (the names by default); ``caption`` (say, which sets)
    goes above them all."""
    if not panels:
        raise ValueError("no scores to draw")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = _figure(4.5 * columns, 3.4 * rows)
    for i, (name, (inside, outside)) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, columns, i + 1)
        inside, outside = (np.asarray(torch.as_tensor(s).double().cpu()) for s in (inside, outside))
        edges = np.histogram_bin_edges(np.concatenate([inside, outside]), bins=bins)
        for values, label in zip((inside, outside), ("in", "out"), strict=True):
            ax.hist(values, bins=edges, density=True, alpha=0.5, label=f"{label} ({len(values)})")
        ax.set_title((titles or {}).get(name, name), fontsize="medium")
        ax.set_xlabel("score (higher = more anomalous)")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    if caption:
        fig.suptitle(caption, fontsize="medium")
    fig.tight_layout()
    return _save(fig, path)


def vae_figures(vae, dataset) -> dict[str, Callable[[Path], Path]]:
    """The plain VAE's figures of a run on ``dataset`` (``Structure.figures``'s default), name -> drawer.

    Uses ``dataset.test``, ``dataset.test_labels`` (may be ``None``) and ``dataset.image_shape``.
    """
    x, labels = dataset.test, getattr(dataset, "test_labels", None)
    shape = getattr(dataset, "image_shape", None)
    figures: dict[str, Callable[[Path], Path]] = {
        "reconstructions.png": lambda p: reconstructions(vae, x, shape, p),
        "samples.png": lambda p: sample_figure(vae, shape, 64, p),
        "latent_codes.png": lambda p: latent_codes(vae, x, labels, p),
        "interpolation.png": lambda p: interpolation(vae, x, shape, p),
    }
    if vae.z_dim == 2:
        figures["manifold.png"] = lambda p: manifold(vae, shape, p)
    return figures


@torch.no_grad()
def class_samples(vae, image_shape: Sequence[int] | None, path: str | Path, columns: int = 10, seed: int = 0) -> Path:
    """E[x|y, z] of a class-conditional model: row c is y = c, column j one z_j ~ N(0, I) shared down the column.

    Reads ``vae.classes``, ``vae.z_dim`` and ``vae.conditional_mean(z, y)`` (M2, Kingma et al. 2014, Fig. 1).
    """
    generator = torch.Generator().manual_seed(seed)
    param = _param(vae)
    z = torch.randn(1, columns, vae.z_dim, generator=generator, dtype=param.dtype).to(param.device)
    y = torch.arange(vae.classes, device=param.device)[:, None]  # (classes, 1) against (1, columns, z_dim)
    means = vae.conditional_mean(z, y)  # (classes, columns, x_dim)
    images = _images(means.reshape(-1, means.shape[-1]), image_shape)
    return _image_figure(images, columns, path, "rows: class y; columns: one style z each")


@torch.no_grad()
def style_transfer(vae, x: torch.Tensor, image_shape: Sequence[int] | None, path: str | Path, rows: int = 8) -> Path:
    """For each of ``rows`` inputs (first column): its style z = E q(z|x, y = argmax q(y|x)), decoded with every y.

    Reads ``vae.style(x) -> (y, z)`` and ``vae.conditional_mean(z, y)`` (Kingma et al. 2014, Fig. 2).
    """
    x = x[spread_rows(x.shape[0], rows)].to(_param(vae).device)
    x = x.reshape(x.shape[0], -1)
    _, z = vae.style(x)
    y = torch.arange(vae.classes, device=x.device)[:, None]
    decoded = vae.conditional_mean(z, y).transpose(0, 1)  # (rows, classes, x_dim)
    images = _images(torch.cat([x[:, None], decoded.to(x.dtype)], 1).reshape(-1, x.shape[1]), image_shape)
    return _image_figure(images, vae.classes + 1, path, "input, then its style decoded with y = 0, 1, ...")


def m2_figures(vae, dataset) -> dict[str, Callable[[Path], Path]]:
    """The semi-supervised M2's figures of a run on ``dataset`` (``M2.figures``), name -> drawer."""
    shape = getattr(dataset, "image_shape", None)
    return {
        "class_samples.png": lambda p: class_samples(vae, shape, p),
        "style_transfer.png": lambda p: style_transfer(vae, dataset.test, shape, p),
    }


def write_all_figures(vae, dataset, metrics: Iterable[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write every figure that applies into ``out_dir``; return the paths written.

    The learning curves, then the figures of the model's structure (``vae.figures(dataset)``; the
    plain VAE's are :func:`vae_figures`). Each figure is isolated: one that fails is reported as a
    ``RuntimeWarning`` naming it and the error, and the others are still written.
    """
    out_dir = Path(out_dir)
    metrics = list(metrics)
    figures: dict[str, Callable[[Path], Path]] = {"learning_curves.png": lambda p: learning_curves(metrics, p)}
    figures.update(vae.figures(dataset) if hasattr(vae, "figures") else vae_figures(vae, dataset))
    written = []
    for name, draw in figures.items():
        try:
            written.append(draw(out_dir / name))
        except Exception as err:  # one broken figure must not cost the others (or the run that asked)
            warnings.warn(f"figure {name} not written: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
    return written
