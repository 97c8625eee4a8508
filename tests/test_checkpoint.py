"""Checkpoints: atomic writes, weights-only loading, RNG and param-store round trips."""

from __future__ import annotations

import random

import numpy as np
import pyro
import pytest
import torch
from torch.distributions import constraints

from pyro_vae import checkpoint as ckpt


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((3, 2), value)}, "epoch": 4, "best_val_elbo": -1.5, "config": {"a": [1, 2]}}


def test_round_trip(tmp_path):
    path = ckpt.save_checkpoint(_state(), tmp_path / "checkpoint.pt")
    loaded = ckpt.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3, 2))
    assert (loaded["epoch"], loaded["best_val_elbo"], loaded["config"]) == (4, -1.5, {"a": [1, 2]})
    assert loaded["format"] == ckpt.FORMAT
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = ckpt.save_checkpoint(_state(), tmp_path / "checkpoint.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(path)


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(_state(1.0), tmp_path / "checkpoint.pt")
    before = path.read_bytes()

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")  # partial bytes, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(3, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_interrupt_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(_state(1.0), tmp_path / "checkpoint.pt")

    def interrupted_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(3, 2))


class Payload:
    """A class whose unpickling would run code: it creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "model": {}, "x": Payload(str(marker))}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*pickled object \(io\.open\).*could run code"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


class Custom:
    pass


def test_custom_class_is_refused(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "model": {"w": torch.ones(1)}, "obj": Custom()}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*test_checkpoint\.Custom"):
        ckpt.load_checkpoint(path)


def test_function_is_refused(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "obj": _state}, path)  # a function: a global
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*test_checkpoint\._state"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no checkpoint at"),
        (b"not a zip file", "cannot read checkpoint .*not a torch checkpoint"),
        ({"model": {}}, "not a pyro_vae checkpoint"),
        ({"format": ckpt.FORMAT, "version": 99}, "version 99"),
    ],
)
def test_unreadable_checkpoints_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_checkpoint(path)


def _draws():
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), np.random.randn()


def test_rng_state_round_trip_through_a_file(tmp_path):
    pyro.set_rng_seed(7)
    np.random.randn()  # numpy caches the second Gaussian of a pair: the cached value must survive too
    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    expected = _draws()
    pyro.set_rng_seed(123)  # anything else in between
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_param_store_round_trip_keeps_constraints(tmp_path):
    pyro.param("scale", torch.tensor([0.5, 2.0]), constraint=constraints.positive)
    pyro.param("loc", torch.tensor([1.0, -1.0]))
    pyro.module("net", torch.nn.Linear(2, 1))
    params, names = ckpt.param_store_state()
    assert names["scale"] == "positive" and names["loc"] == "real"
    ckpt.save_checkpoint({"param_store": params, "param_constraints": names}, tmp_path / "p.pt")
    pyro.clear_param_store()
    state = ckpt.load_checkpoint(tmp_path / "p.pt")
    ckpt.restore_param_store(state["param_store"], state["param_constraints"])
    store = pyro.get_param_store()
    assert torch.allclose(pyro.param("scale"), torch.tensor([0.5, 2.0]))
    assert store._constraints["scale"] is constraints.positive
    assert torch.equal(pyro.param("loc"), torch.tensor([1.0, -1.0]))
    # Module parameters come back through the module's state_dict, not as stray copies in the store.
    assert not any("$$$" in name for name in store.get_state()["params"])


def test_unstorable_constraint_is_named(tmp_path):
    pyro.param("p", torch.tensor([0.2]), constraint=constraints.interval(0.0, 0.5))
    with pytest.raises(ckpt.CheckpointError, match="param 'p' has constraint"):
        ckpt.param_store_state()
