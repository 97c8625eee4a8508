"""Figures: every one is written as a valid, non-blank PNG for grey and colour images, the manifold
only for z_dim = 2, partial metrics are drawn, a failing figure does not stop the others, nothing leaks."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch

from pyro_vae import plots
from pyro_vae.model import VAE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = [
    {"epoch": 1, "train_elbo": -200.0, "val_elbo": -190.0, "test_elbo": -191.0, "seconds": 1.0},
    {"epoch": 2, "train_elbo": -150.0, "val_elbo": -149.0, "seconds": 1.0},  # no test ELBO this epoch
    {"epoch": 3, "train_elbo": -140.0, "val_elbo": None, "test_elbo": -139.0, "seconds": 1.0},
]


def _dataset(image_shape, n: int = 60, classes: int = 10) -> SimpleNamespace:
    d = int(np.prod(image_shape))
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        name="fake",
        test=torch.rand(n, d, generator=g),
        test_labels=torch.arange(n) % classes,
        image_shape=image_shape,
    )


def _vae(x_dim: int, z_dim: int, network: str | None = None, image_shape=None) -> VAE:
    """The MLP VAE; with ``network`` (``"conv(channels=4)"``) that body both ways, on images of ``image_shape``."""
    if network is None:
        return VAE(x_dim=x_dim, z_dim=z_dim, hidden_dims=(16,))
    return VAE(x_dim=x_dim, z_dim=z_dim, x_shape=image_shape, encoder=network, decoder=network)


def assert_png(path: Path, min_bytes: int = 2000) -> np.ndarray:
    """A readable PNG of non-trivial size whose pixels are not all one colour."""
    assert path.is_file(), f"{path.name} was not written"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > min_bytes, f"{path.name} has only {len(data)} bytes"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50 and pixels[..., :3].std() > 0.01, f"{path.name} looks blank"
    return pixels


def _no_open_figures() -> bool:
    from matplotlib import _pylab_helpers

    return _pylab_helpers.Gcf.get_num_fig_managers() == 0


@pytest.mark.parametrize(
    ("image_shape", "z_dim", "expected", "network"),
    [
        ((1, 28, 28), 2, {"manifold.png"}, None),
        ((1, 28, 28), 5, set(), None),
        ((3, 32, 32), 3, set(), None),
        ((3, 32, 32), 3, set(), "conv(channels=4)"),  # a decoder whose head is a 1x1 conv on a feature map
        ((1, 28, 28), 2, {"manifold.png"}, "resnet(width=4)"),
    ],
)
def test_write_all_figures(tmp_path, image_shape, z_dim, expected, network):
    data = _dataset(image_shape)
    vae = _vae(data.test.shape[1], z_dim, network, image_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no figure may fail silently into a warning here
        written = plots.write_all_figures(vae, data, METRICS, tmp_path)
    names = {p.name for p in written}
    common = {"learning_curves.png", "reconstructions.png", "samples.png", "latent_codes.png", "interpolation.png"}
    assert names == common | expected
    assert set(p.name for p in tmp_path.iterdir()) == names
    for path in written:
        pixels = assert_png(path)
        if image_shape[0] == 3 and path.name in ("samples.png", "reconstructions.png", "interpolation.png"):
            # colour images: the channels differ somewhere
            assert np.abs(pixels[..., 0] - pixels[..., 1]).max() > 0.05
    assert _no_open_figures()


def test_image_grid_places_each_image():
    images = np.stack([np.full((2, 3, 1), v, dtype=np.float32) for v in (0.0, 0.25, 0.5, 0.75, 1.0)])
    grid = plots._grid(images, ncol=2, pad=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    assert grid[1:3, 1:4].max() == 0.0 and (grid[1:3, 5:8] == 0.25).all() and (grid[7:9, 1:4] == 1.0).all()
    assert (grid[7:9, 5:8] == 1.0).all()  # the empty sixth cell is padding (white)


def test_images_follow_channel_first_shape():
    x = torch.zeros(1, 2 * 3 * 4)
    x[0, 12:24] = 1.0  # the second channel
    images = plots._images(x, (2, 3, 4))
    assert images.shape == (1, 3, 4, 2) and (images[0, :, :, 1] == 1).all() and (images[0, :, :, 0] == 0).all()
    with pytest.raises(ValueError, match=r"image_shape \(1, 28, 28\) has 784 values, but examples have 24"):
        plots._images(x, (1, 28, 28))


def test_learning_curves_draw_partial_metrics_and_reject_empty(tmp_path):
    assert_png(plots.learning_curves([{"train_elbo": -120.0}, {"train_elbo": -110.0}], tmp_path / "a.png"))
    assert_png(plots.learning_curves(METRICS, tmp_path / "b.png"))
    with pytest.raises(ValueError, match="none of train_elbo, val_elbo, test_elbo"):
        plots.learning_curves([{"epoch": 1, "seconds": 2.0}], tmp_path / "c.png")


def test_one_failing_figure_does_not_stop_the_others(tmp_path):
    data = _dataset((1, 28, 28))
    vae = _vae(784, 2)
    with pytest.warns(RuntimeWarning, match="learning_curves.png not written: ValueError: no learning curve"):
        written = plots.write_all_figures(vae, data, [], tmp_path)
    assert {p.name for p in written} == {
        "reconstructions.png",
        "samples.png",
        "latent_codes.png",
        "interpolation.png",
        "manifold.png",
    }
    assert _no_open_figures()


def test_latent_codes_without_labels_and_with_many_classes_and_one_dimension(tmp_path):
    data = _dataset((1, 4, 4), n=40, classes=40)
    assert_png(plots.latent_codes(_vae(16, 3), data.test, None, tmp_path / "nolabels.png"))
    assert_png(plots.latent_codes(_vae(16, 3), data.test, data.test_labels, tmp_path / "colorbar.png"))
    assert_png(plots.latent_codes(_vae(16, 1), data.test, data.test_labels, tmp_path / "one.png"))


def test_pca_projects_onto_the_largest_variance_directions():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 0.1, 2.0], dtype=torch.float64)
    coords, labels = plots._pca2(z)
    centered = z - z.mean(0)
    # The two components keep (almost) all of the variance of dims 0 and 2, in that order.
    assert float(coords[:, 0].var()) == pytest.approx(float(centered[:, 0].var()), rel=0.01)
    assert float(coords[:, 1].var()) == pytest.approx(float(centered[:, 2].var()), rel=0.01)
    assert labels[0].startswith("PC1 (")


def test_sample_figure_and_manifold_errors(tmp_path):
    vae = _vae(784, 3)
    assert_png(plots.sample_figure(vae, (1, 28, 28), 5, tmp_path / "sub" / "s.png"))
    with pytest.raises(ValueError, match="z_dim = 2"):
        plots.manifold(vae, (1, 28, 28), tmp_path / "m.png")
    with pytest.raises(ValueError, match="at least 1"):
        plots.sample_figure(vae, (1, 28, 28), 0, tmp_path / "s0.png")


def test_score_histograms_one_panel_per_score(tmp_path):
    g = torch.Generator().manual_seed(0)
    panels = {f"score{i}": (torch.randn(100, generator=g), np.random.default_rng(i).normal(1, 1, 80)) for i in range(4)}
    path = plots.score_histograms(panels, tmp_path / "h.png", titles={"score0": "first"}, caption="in: a   out: b")
    pixels = assert_png(path)
    assert pixels.shape[1] > pixels.shape[0]  # 3 columns, 2 rows
    assert _no_open_figures()
    with pytest.raises(ValueError, match="no scores to draw"):
        plots.score_histograms({}, tmp_path / "none.png")
