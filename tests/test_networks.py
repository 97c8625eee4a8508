"""Weight initialization of the encoder and decoder (``networks.INITIALIZERS``, ``VAE(init=...)``)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch import nn

from pyro_vae import config
from pyro_vae.checks import load_config
from pyro_vae.config import Config, ConfigError, apply_overrides
from pyro_vae.model import VAE
from pyro_vae.networks import INITIALIZERS, initialize, mlp
from pyro_vae.runs import build_vae

# 784 x 400 = 313 600 weights per first layer: the sample moments below have standard errors of
# a few parts in a thousand, and every tolerance is 5 of them.
X_DIM, WIDTH = 784, 400


def linear_layers(vae: VAE) -> list[nn.Linear]:
    return [m for m in (*vae.encoder.modules(), *vae.decoder.modules()) if type(m) is nn.Linear]


def test_he_normal_moments():
    torch.manual_seed(0)
    vae = VAE(x_dim=X_DIM, hidden_dims=(WIDTH,), init="he")
    for layer in linear_layers(vae):
        w = layer.weight.detach().double().flatten()
        n, fan_in = w.numel(), layer.in_features
        sigma = math.sqrt(2 / fan_in)
        assert abs(w.mean().item()) < 5 * sigma / math.sqrt(n)
        # sd of a sample sd of n normal draws: sigma / sqrt(2n)
        assert abs(w.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n)
        assert torch.count_nonzero(layer.bias) == 0


def test_glorot_uniform_support_and_variance():
    torch.manual_seed(1)
    vae = VAE(x_dim=X_DIM, hidden_dims=(WIDTH,), init="glorot")
    for layer in linear_layers(vae):
        w = layer.weight.detach().double().flatten()
        n = w.numel()
        a = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert w.abs().max().item() <= a
        # U(-a, a): variance a^2/3; the sample variance's sd is sqrt(mu4 - sigma^4)/sqrt(n), mu4 = a^4/5
        se = a**2 * math.sqrt(1 / 5 - 1 / 9) / math.sqrt(n)
        assert abs(w.var().item() - a**2 / 3) < 5 * se
        assert torch.count_nonzero(layer.bias) == 0


def test_torch_init_is_pytorch_default_and_others_differ():
    def build(init: str) -> VAE:
        torch.manual_seed(2)
        return VAE(x_dim=20, z_dim=3, hidden_dims=(8,), init=init)

    default, torch_init, he = build("torch"), build("torch"), build("he")
    torch.manual_seed(2)
    implicit = VAE(x_dim=20, z_dim=3, hidden_dims=(8,))
    for a, b in zip(implicit.parameters(), torch_init.parameters(), strict=True):
        assert torch.equal(a, b)
    # PyTorch's default: |W| <= 1/sqrt(fan_in), biases not zero.
    first = default.encoder.net.body.layers[0]
    assert first.weight.abs().max() <= 1 / math.sqrt(20) and torch.count_nonzero(first.bias) > 0
    assert not torch.equal(he.encoder.net.body.layers[0].weight, first.weight)


def test_flow_layers_and_prior_keep_their_own_initialization():
    """Only plain nn.Linear layers of the encoder/decoder change: Pyro's masked layers and the prior do not."""

    def build(init: str) -> VAE:
        torch.manual_seed(3)
        return VAE(x_dim=12, z_dim=4, hidden_dims=(8,), guide="iaf(flows=1)", prior="vamp(components=3)", init=init)

    a, b = build("torch"), build("he")
    flow_a = [p for n, p in a.encoder.named_parameters() if not n.startswith("net.")]
    flow_b = [p for n, p in b.encoder.named_parameters() if not n.startswith("net.")]
    assert flow_a, "the IAF guide should own flow parameters"
    for p, q in zip(flow_a, flow_b, strict=True):
        assert torch.equal(p, q)
    for p, q in zip(a.prior.parameters(), b.prior.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a.encoder.net.body.layers[0].weight, b.encoder.net.body.layers[0].weight)
    assert not torch.equal(a.decoder.body.layers[0].weight, b.decoder.body.layers[0].weight)


def test_initialize_unknown_scheme_lists_valid():
    with pytest.raises(ValueError, match=r"unknown init 'xavier'.*valid: torch, glorot, he"):
        initialize([mlp(3, [4], 2)], "xavier")
    with pytest.raises(ValueError, match="unknown init"):
        VAE(x_dim=4, z_dim=2, hidden_dims=(3,), init="kaiming")


def test_config_init_reaches_the_model_and_is_checked():
    cfg = apply_overrides(Config(), ["model.init=he", "model.hidden_dims=[16]", "model.z_dim=2"])
    torch.manual_seed(0)
    vae = build_vae(cfg.model, x_dim=30)
    assert vae.init == "he"
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in linear_layers(vae))
    with pytest.raises(ConfigError, match='did you mean "glorot"'):
        load_config(None, ["model.init=glorrot"])
    with pytest.raises(ConfigError, match=r"unknown activation .tahn. for model.activation \(did you mean \"tanh\"\?"):
        load_config(None, ["model.activation=tahn"])
    assert config.load_config(None, ["model.init=glorrot"]).model.init == "glorrot"  # as documented
    assert set(INITIALIZERS) == {"torch", "glorot", "he"}


# -- networks by name ---------------------------------------------------------------------------
def test_mlp_body_flattens_the_event_and_reports_its_width():
    from pyro_vae.networks import NETWORKS, build_network

    body = build_network("mlp(hidden=[7, 5], activation='tanh')", (1, 3, 4))
    assert isinstance(body, NETWORKS.factory("mlp")) and body.out_features == 5
    out = body(torch.rand(2, 6, 1, 3, 4))  # particle and batch dimensions kept, the event flattened
    assert out.shape == (2, 6, 5)
    assert build_network("mlp(hidden=[])", (9,)).out_features == 9  # no hidden layer: the input itself


def test_gated_mlp_is_tomczak_and_wellings_gated_dense_stack():
    """Each layer is (W x + b) * sigmoid(V x + c); a VAE with gated bodies trains a step."""
    from pyro_vae.networks import build_network

    body = build_network("gated_mlp(hidden=[5, 4])", (1, 2, 3))
    x = torch.rand(2, 7, 1, 2, 3)
    h = x.reshape(2, 7, 6)
    for layer in body.layers:
        h = (h @ layer.linear.weight.T + layer.linear.bias) * torch.sigmoid(h @ layer.gate.weight.T + layer.gate.bias)
    torch.testing.assert_close(body(x), h)
    assert body.out_features == 4
    vae = VAE(x_dim=6, z_dim=2, encoder="gated_mlp(hidden=[5])", decoder="gated_mlp(hidden=[5])", init="he")
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, torch.rand(3, 6).round())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    with pytest.raises(ValueError, match="gated_mlp needs at least one hidden width"):
        build_network("gated_mlp(hidden=[])", (6,))


def test_network_specs_give_the_shorthand_vae_bit_for_bit():
    torch.manual_seed(4)
    shorthand = VAE(x_dim=20, z_dim=3, hidden_dims=(8, 6), activation="tanh")
    torch.manual_seed(4)
    named = VAE(
        x_dim=20,
        z_dim=3,
        encoder={"name": "mlp", "hidden": [8, 6], "activation": "tanh"},
        decoder="mlp(hidden=[6, 8], activation='tanh')",
    )
    for (name, a), (other, b) in zip(shorthand.state_dict().items(), named.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b)


def test_encoder_and_decoder_can_differ_and_the_heads_follow_the_families():
    vae = VAE(x_dim=10, z_dim=3, encoder="mlp(hidden=[16])", decoder="mlp(hidden=[4, 4])", likelihood="beta")
    assert vae.encoder.net.head.in_features == 16 and vae.encoder.net.head.out_features == 2 * 3
    assert vae.decoder.head.in_features == 4 and vae.decoder.head.out_features == vae.likelihood.out_dim == 20
    lowrank = VAE(x_dim=10, z_dim=3, encoder="mlp(hidden=[16])", guide="lowrank(rank=2)")
    assert lowrank.encoder.net.head.out_features == 2 * 3 + 3 * 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.encoder=convv",
            r"unknown network .convv. \(did you mean \"conv\"\?\); valid networks: conv, .*gated_mlp, .*resnet",
        ),
        ("model.decoder=mlp(widths=[3])", r"network 'mlp' has no argument 'widths'.*its arguments: hidden, activation"),
    ],
)
def test_network_spec_errors_name_the_valid_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_network_keys_reach_the_model():
    cfg = apply_overrides(Config(), ["model.encoder=mlp(hidden=[12])", "model.z_dim=2"])
    vae = build_vae(cfg.model, x_dim=20)
    assert vae.encoder.net.body.out_features == 12 and vae.decoder.body.out_features == 400  # decoder: shorthand


def test_checkpoints_of_one_sequential_mlps_still_load():
    """Before the body + head split an MLP was one nn.Sequential; its state dict loads unchanged."""
    torch.manual_seed(5)
    vae = VAE(x_dim=20, z_dim=3, hidden_dims=(8, 6), guide="iaf(flows=1)")
    legacy = {}
    for key, value in vae.state_dict().items():
        key = key.replace("encoder.net.head.", "encoder.net.net.4.").replace(
            "encoder.net.body.layers.", "encoder.net.net."
        )
        key = key.replace("decoder.head.", "decoder.net.4.").replace("decoder.body.layers.", "decoder.net.")
        legacy[key] = value.clone()
    assert "encoder.net.net.4.weight" in legacy and "decoder.net.0.weight" in legacy
    fresh = VAE(x_dim=20, z_dim=3, hidden_dims=(8, 6), guide="iaf(flows=1)")
    fresh.load_state_dict(legacy)
    for name, value in vae.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_the_encoder_body_sees_the_data_in_its_event_shape(tmp_path):
    from pyro_vae.checks import load_config as load_checked
    from pyro_vae.runs import load_run
    from pyro_vae.train import train

    cfg = load_checked(
        None,
        [
            "data.name=synthetic(num_train=40, num_test=20, side=4, components=2)",
            "model.z_dim=2",
            "model.hidden_dims=[5]",
            "model.prior=vamp(components=3)",
            "train.epochs=1",
            "train.warmup_epochs=1",
            "train.batch_size=20",
            "train.nll_samples=0",
            "train.plots=false",
            "train.device=cpu",
        ],
    )
    train(cfg, tmp_path / "run", progress=False)
    vae = load_run(tmp_path / "run", device="cpu", load_data=False).vae
    assert vae.encoder.net.body.in_shape == (1, 4, 4) and vae.x_shape == (1, 4, 4)
    assert vae.prior.pseudo_inputs.shape == (3, 16)
    seen = []
    vae.encoder.net.body.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    vae.posterior(torch.rand(6, 16))
    vae.prior_distribution()
    assert seen == [(6, 1, 4, 4), (3, 1, 4, 4)]  # data and pseudo-inputs alike
    with pytest.raises(ValueError, match=r"x_shape \(3, 4\) holds 12 values, but x_dim is 10"):
        VAE(x_dim=10, z_dim=2, x_shape=(3, 4))
