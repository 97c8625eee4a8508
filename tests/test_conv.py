"""Image networks (pyro_vae/conv.py) and the heads that put a likelihood on a feature map (networks.output_head).

Every network with every likelihood builds on 1x28x28 and 3x32x32 images, gives a finite ELBO and
a gradient on every parameter; every prior, guide and estimator runs on a conv body; shapes that do
not fit are one-line errors naming both shapes.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, estimators
from pyro_vae.conv import ConvBody, ResNetBody
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS, DiscretizedLogisticMixture, per_pixel
from pyro_vae.networks import NETWORKS, PixelHead, build_network, output_head
from pyro_vae.priors import PRIORS
from pyro_vae.specs import SpecError

SHAPES = [(1, 28, 28), (3, 32, 32)]
# Small widths: the tests are about shapes and gradients, not capacity.
SMALL = {"mlp": "mlp(hidden=[8])", "conv": "conv(channels=4)", "resnet": "resnet(width=4)"}
# Data each likelihood accepts: binary for the Bernoulli (it warns on grey levels), 8-bit grey levels otherwise.
BINARY_LIKELIHOODS = {"bernoulli"}


def small(network: str) -> str:
    """A narrow spec of ``network``; a body registered elsewhere gets ``hidden=[8]`` when it takes ``hidden``
    (a default width of 400 to 256 x 3072 categorical logits would be a third of a billion parameters)."""
    if network in SMALL:
        return SMALL[network]
    return f"{network}(hidden=[8])" if "hidden" in NETWORKS.user_keys(network, ("in_shape", "out_shape")) else network


def images(shape, n: int = 3, binary: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, math.prod(shape)), generator=g) / 255.0
    return (levels > 0.5).float() if binary else levels


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
@pytest.mark.parametrize("network", NETWORKS.names())
def test_every_network_and_likelihood_gives_a_finite_elbo_and_every_gradient(network, likelihood, shape):
    spec = small(network)
    vae = VAE(x_dim=math.prod(shape), z_dim=3, x_shape=shape, encoder=spec, decoder=spec, likelihood=likelihood)
    x = images(shape, binary=likelihood in BINARY_LIKELIHOODS)
    vae.check_data(x, "data")
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert vae.reconstruct(x).shape == x.shape and vae.sample(2).shape == (2, x.shape[1])


def _conv_vae(**families) -> VAE:
    return VAE(
        x_dim=784, z_dim=3, x_shape=(1, 28, 28), encoder="conv(channels=4)", decoder="conv(channels=4)", **families
    )


@pytest.mark.parametrize(
    ("family", "name"),
    [("prior", n) for n in PRIORS.names()] + [("guide", n) for n in GUIDES.names()],
)
def test_every_prior_and_guide_runs_on_a_conv_body(family, name):
    vae = _conv_vae(**{family: name})
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, images((1, 28, 28), binary=True))
    assert torch.isfinite(loss)
    loss.backward()


ESTIMATOR_SPECS = {"iwae": "iwae(k=2)", "dreg": "dreg(k=2)", "renyi": "renyi(k=2)"}


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")  # enum on a model with nothing to enumerate
@pytest.mark.parametrize("name", estimators.ESTIMATORS.names())
def test_every_estimator_trains_a_conv_body(name):
    vae = _conv_vae()
    estimator = estimators.get(ESTIMATOR_SPECS.get(name, name))
    pyro.clear_param_store()
    loss = estimator.loss(vae, images((1, 28, 28), binary=True))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in vae.decoder.parameters())


# -- shapes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "spec"), [(ConvBody, "conv(channels=4, depth=2)"), (ResNetBody, "resnet(width=4)")])
@pytest.mark.parametrize("shape", SHAPES)
def test_bodies_halve_and_double_the_image_and_keep_leading_dimensions(cls, spec, shape):
    encoder = build_network(spec, shape)
    _, h, w = shape
    assert isinstance(encoder, cls) and encoder.out_shape == (encoder.out_features,)
    assert encoder(torch.rand(2, 5, *shape)).shape == (2, 5, encoder.out_features)  # particles, batch
    assert encoder.out_features == encoder.top * (h // 4) * (w // 4)
    decoder = build_network(spec, (6,), out_shape=shape)
    assert decoder.out_shape == (decoder.features, h, w)
    assert decoder(torch.randn(2, 5, 6)).shape == (2, 5, decoder.features, h, w)


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 6])
def test_every_kernel_keeps_the_image_size(kernel):
    assert build_network(f"conv(kernel={kernel})", (3, 32, 32)).out_features == 64 * 8 * 8
    assert build_network(f"conv(kernel={kernel})", (2,), out_shape=(1, 28, 28)).out_shape == (32, 28, 28)


def test_the_pixel_head_writes_parameter_blocks_in_channel_first_order():
    """Output p * C H W + c H W + h W + w is parameter p of pixel (c, h, w): the layout of a linear head."""
    torch.manual_seed(0)
    head = PixelHead(features=5, channels=2 * 3, size=(4, 4))
    features = torch.randn(7, 5, 4, 4)
    out = head(features)
    per_channel = torch.einsum("of,nfhw->nohw", head.conv.weight[:, :, 0, 0], features) + head.conv.bias[:, None, None]
    torch.testing.assert_close(out, per_channel.reshape(7, 2 * 3 * 16))
    blocks = out.reshape(7, 2, 3 * 16)  # (batch, parameter, pixel) as Likelihood.split_params reads it
    torch.testing.assert_close(blocks[:, 1, 16:32], per_channel[:, 4].reshape(7, 16))  # parameter 1, channel 1


def test_discretized_logistic_mixture_of_ten_on_a_feature_map_sums_to_one_per_channel():
    """mixtures=10 on 3x32x32 through a pixel head: each channel's 256 bin masses sum to 1 (float32)."""
    torch.manual_seed(0)
    vae = VAE(x_dim=3072, z_dim=3, x_shape=(3, 32, 32), encoder="conv(channels=4)", decoder="conv(channels=4)")
    vae.likelihood = LIKELIHOODS.build("discretized_logistic(mixtures=10)", x_dim=3072)
    head = output_head(vae.decoder.body, (3, 32, 32), vae.likelihood.params_per_pixel)
    assert head.conv.out_channels == 3 * 10 * 3
    params = head(vae.decoder.body(torch.randn(2, 3)))
    pixels = per_pixel(vae.likelihood(params))
    assert isinstance(pixels, DiscretizedLogisticMixture) and pixels.batch_shape == (2, 3072)
    levels = (torch.arange(256) / 255.0).reshape(256, 1, 1).expand(256, 2, 3072)
    total = pixels.log_prob(levels).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(2, 3072), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "in_shape", "out_shape", "phrase"),
    [
        ("resnet(levels=3)", (1, 28, 28), None, "H and W multiples of 8; the data's event shape is (1, 28, 28)"),
        ("conv(depth=3)", (2,), (1, 28, 28), "H and W multiples of 8; the data's event shape is (1, 28, 28)"),
        ("conv", (784,), None, "got input shape (784,) and output shape None"),
        ("resnet", (2,), (784,), "needs images of event shape (C, H, W) as output, got (784,)"),
        ("conv(norm='batchnorm')", (1, 28, 28), None, "unknown norm 'batchnorm' (did you mean \"batch\"?)"),
        ("resnet(kernel=4)", (1, 28, 28), None, "kernel must be odd"),
        ("conv(channels=100000)", (1, 28, 28), None, "channels must be at most 2048"),
        ("resnet(levels=1000000000)", (1, 28, 28), None, "levels must be at most 16"),
    ],
)
def test_bodies_that_do_not_fit_are_one_line_errors(spec, in_shape, out_shape, phrase):
    with pytest.raises(SpecError) as info:
        build_network(spec, in_shape, out_shape=out_shape)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_a_built_body_for_other_images_is_refused_naming_both_shapes():
    body = build_network("conv(channels=4)", (1, 32, 32))
    with pytest.raises(ValueError, match=r"built for event shape \(1, 32, 32\); the data's is \(3, 32, 32\)"):
        build_network(body, (3, 32, 32))


def test_a_decoder_feature_map_of_another_size_is_refused_by_the_head():
    body = build_network("conv(channels=4)", (2,), out_shape=(1, 28, 28))
    with pytest.raises(
        ValueError, match=r"feature map \(4, 28, 28\) does not fit the data's event shape \(1, 32, 32\)"
    ):
        output_head(body, (1, 32, 32), 1)


def test_an_eight_bit_likelihood_on_float_data_is_one_line():
    vae = _conv_vae(likelihood="discretized_logistic")
    x = torch.rand(4, 784, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not on the 8-bit grid") as info:
        vae.check_data(x, "train data")
    assert "\n" not in str(info.value)
