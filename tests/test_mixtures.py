"""The matrix-product density of a diagonal Gaussian mixture against ``MixtureSameFamily``."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.mixtures import DiagonalGaussianMixture


def reference(logits, loc, scale):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))


def parameters(dtype, k=7, d=5, small_scales=False):
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(k, d, generator=gen, dtype=dtype)
    scale = torch.rand(k, d, generator=gen, dtype=dtype) + 0.05
    if small_scales:  # the encoder's floor: the expansion's terms reach 1e8 and must still cancel
        scale[0, :2] = 1e-4
    logits = torch.randn(k, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (logits, loc, scale)]


@pytest.mark.parametrize("shape", [(9,), (3, 9), (2, 3, 4)])
def test_log_prob_and_gradients_equal_mixture_same_family(shape):
    logits, loc, scale = parameters(torch.float64)
    z = torch.randn(*shape, loc.shape[-1], dtype=torch.float64, requires_grad=True)
    ours = DiagonalGaussianMixture(logits, loc, scale).log_prob(z)
    theirs = reference(logits, loc, scale).log_prob(z)
    assert ours.shape == theirs.shape == torch.Size(shape)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    weights = torch.randn(shape, dtype=torch.float64)
    grads = torch.autograd.grad((ours * weights).sum(), (z, logits, loc, scale))
    expected = torch.autograd.grad((theirs * weights).sum(), (z, logits, loc, scale))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_float32_at_the_scale_floor_keeps_float32_precision():
    """A point on a component with scale 1e-4 (terms of 1e8 in the expansion) is exact to float32 rounding."""
    logits, loc, scale = parameters(torch.float32, small_scales=True)
    z = torch.cat([loc[:1].detach() + 1e-5, torch.randn(4, loc.shape[-1])])
    ours = DiagonalGaussianMixture(logits, loc, scale).log_prob(z)
    exact = reference(*(t.detach().double() for t in (logits, loc, scale))).log_prob(z.double())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=1e-4)


def test_sampling_is_the_mixture_s():
    logits, loc, scale = (t.detach() for t in parameters(torch.float64))
    torch.manual_seed(0)
    draws = DiagonalGaussianMixture(logits, loc, scale).sample((40000,))
    mean = (torch.softmax(logits, 0)[:, None] * loc).sum(0)
    se = draws.std(0) / 200
    assert ((draws.mean(0) - mean).abs() < 4.5 * se).all()


def test_shapes_are_checked_in_one_line():
    with pytest.raises(ValueError, match=r"loc and scale of shape \(K, D\)"):
        DiagonalGaussianMixture(torch.zeros(3), torch.zeros(2, 3, 4), torch.ones(2, 3, 4))


def test_expanded_in_a_plate_it_scores_each_example():
    logits, loc, scale = (t.detach() for t in parameters(torch.float64))
    mixture = DiagonalGaussianMixture(logits, loc, scale).expand((6,))
    assert mixture.batch_shape == (6,) and mixture.event_shape == (5,)
    z = torch.randn(2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(mixture.log_prob(z), reference(logits, loc, scale).log_prob(z))
    assert mixture.log_prob(z[0, 0]).shape == (6,)
