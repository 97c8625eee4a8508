"""Anomaly scores: each against its formula on the exact linear-Gaussian model; compressed lengths;
likelihood regret reaching the exact ELBO gap; the registry's one-line refusals."""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import pyro
import pytest
import torch
from linear_gaussian import linear_gaussian
from PIL import Image

from pyro_vae.complexity import compressed_bits, eight_bit_images
from pyro_vae.evaluate import elbo_per_example
from pyro_vae.local_fit import substituted
from pyro_vae.model import VAE
from pyro_vae.scores import SCORES
from pyro_vae.specs import SpecError

SHAPE = (1, 2, 3)  # the linear-Gaussian model's 6 values seen as a 2x3 image


@pytest.fixture(scope="module")
def lg_model():
    lg = linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0)
    x = lg.sample(5, generator=torch.Generator().manual_seed(1))
    return lg, x


def _score(spec: str, vae, x) -> torch.Tensor:
    return SCORES.build(spec)(vae, x, image_shape=SHAPE)


def test_log_px_is_the_negated_exact_log_likelihood_under_the_exact_guide(lg_model):
    lg, x = lg_model
    vae = lg.build_vae(exact_posterior=True)
    score = _score("log_px(samples=10)", vae, x)
    assert score.dtype == torch.float64 and score.shape == (5,)
    torch.testing.assert_close(score, -lg.log_px(x), rtol=0, atol=1e-9)


def test_elbo_is_the_negated_per_example_elbo(lg_model):
    lg, x = lg_model
    vae = lg.build_vae(exact_posterior=False)
    pyro.set_rng_seed(3)
    score = _score("elbo(particles=4)", vae, x)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(score, -elbo_per_example(vae, x, num_samples=4).double())


@pytest.mark.parametrize("compressor", ["png", "zlib"])
def test_input_complexity_is_nll_in_bits_minus_the_compressed_length(lg_model, compressor):
    lg, x = lg_model
    vae = lg.build_vae(exact_posterior=True)  # exact log p(x): the formula can be checked to rounding
    score = _score(f"input_complexity(samples=4, compressor={compressor!r})", vae, x)
    expected = -lg.log_px(x) / math.log(2) - compressed_bits(x, SHAPE, compressor)
    torch.testing.assert_close(score, expected, rtol=0, atol=1e-9)


def test_eight_bit_images_and_lossless_compressed_lengths():
    g = torch.Generator().manual_seed(0)
    binary = (torch.rand(3, 64, generator=g) < 0.5).float()
    images = eight_bit_images(binary, (1, 8, 8))
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8) and set(np.unique(images)) <= {0, 255}
    colour = torch.rand(2, 3 * 4 * 5, generator=g)
    rgb = eight_bit_images(colour, (3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3)  # channel-first rows -> channel-last images
    assert rgb[1, 2, 3, 0] == round(255 * float(colour[1, 0 * 20 + 2 * 5 + 3]))
    for image, bits in zip(images, compressed_bits(binary, (1, 8, 8), "zlib"), strict=True):
        assert bits == 8 * len(zlib.compress(image.tobytes(), 9))
    for image, bits in zip(rgb, compressed_bits(colour, (3, 4, 5), "png"), strict=True):
        assert bits % 8 == 0
        decoded = np.asarray(Image.open(io.BytesIO(_png_bytes(image))))
        assert np.array_equal(decoded, image)  # lossless
    flat, noisy = torch.full((1, 784), 0.5), torch.rand(1, 784, generator=g)
    assert compressed_bits(flat, (1, 28, 28)) < compressed_bits(noisy, (1, 28, 28)) / 10
    with pytest.raises(ValueError, match="not 2 channels"):
        eight_bit_images(torch.zeros(1, 8), (2, 2, 2))


def _png_bytes(image: np.ndarray) -> bytes:
    from pyro_vae.complexity import COMPRESSORS

    return COMPRESSORS["png"](image)


def test_likelihood_regret_reaches_the_exact_elbo_gap(lg_model):
    """The exact posterior is in the diagonal family: optimizing q for each x alone closes the gap, so
    LR(x) -> log p(x) - ELBO(x; q(z|x)) = KL(q(z|x) || p(z|x)), known exactly (about 1 nat here)."""
    lg, x = lg_model
    vae = lg.build_vae(exact_posterior=False)
    flags = [p.requires_grad for p in vae.parameters()]
    regret = _score("likelihood_regret(steps=200, particles=2000, step_particles=16)", vae, x)
    gap = lg.kl_to_posterior(vae, x).detach()
    assert (gap > 0.3).all(), "the guide should be far from the posterior, or the test checks nothing"
    # 2000 draws leave ~0.1 nat of noise in each ELBO; seeds 0-8 were all within 0.17 of the gap
    torch.testing.assert_close(regret, gap, rtol=0.05, atol=0.25)
    assert [p.requires_grad for p in vae.parameters()] == flags and all(p.grad is None for p in vae.parameters())
    exact = lg.build_vae(exact_posterior=True)
    assert _score("likelihood_regret(steps=0)", exact, x).abs().max() < 1e-12  # the same q on the same draws
    # started at the optimum, the optimizer's noisy steps only lose a little (seeds 0-8: at most 0.03)
    assert _score("likelihood_regret(steps=50, particles=2000, step_particles=16)", exact, x).abs().max() < 0.1


def test_substitution_replaces_q_of_the_batch_only_not_a_vamp_priors_pseudo_inputs():
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,), prior="vamp(components=3)").eval()
    x = torch.rand(4, 6)
    net = vae.encoder.net
    with torch.no_grad():
        prior_before = vae.prior_distribution().log_prob(torch.zeros(2))
        raw = net.raw(x) + 1.0
        with substituted(net, x, raw):
            q = vae.posterior(x)
            prior_inside = vae.prior_distribution().log_prob(torch.zeros(2))
    torch.testing.assert_close(q.base_dist.loc, net.params(raw)[0])
    torch.testing.assert_close(prior_inside, prior_before)


def test_likelihood_regret_refuses_a_model_without_one_amortized_q():
    m2 = VAE(x_dim=6, z_dim=2, hidden_dims=(5,), structure="m2(classes=3)")
    with pytest.raises(ValueError, match="likelihood_regret optimizes the parameters of q"):
        _score("likelihood_regret(steps=1)", m2, torch.rand(4, 6))


def test_the_registry_refuses_unknown_names_and_arguments_in_one_line():
    with pytest.raises(SpecError, match=r"unknown score 'log_p'.*valid scores: elbo, input_complexity, likelihood_re"):
        SCORES.build("log_p")
    with pytest.raises(SpecError, match="has no argument 'k'"):
        SCORES.build("log_px(k=5)")
    with pytest.raises(SpecError, match="samples must be a positive integer"):
        SCORES.build("log_px(samples=0)")
    with pytest.raises(SpecError, match=r"unknown compressor 'flif'.*valid compressors: png, zlib"):
        SCORES.build("input_complexity(compressor='flif')")
