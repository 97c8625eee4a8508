"""The one Registry: ``check`` refuses bad names and keys without building; ``build`` refuses them the same way."""

from __future__ import annotations

import pytest

from pyro_vae.registry import Registry
from pyro_vae.specs import SpecError

SHAPES: Registry[dict] = Registry("shape")


@SHAPES.register("box")
def _box(size: int, width: int = 1, depth: int = 1) -> dict:  # size: context, passed by the caller
    if depth < 1:
        raise ValueError("depth must be at least 1")
    return {"size": size, "width": width, "depth": depth}


@SHAPES.register("ball")
def _ball(size: int, radius: float = 1.0) -> dict:
    return {"size": size, "radius": radius}


def test_check_parses_without_building():
    assert SHAPES.check("box(width=2)", context=("size",)) == ("box", {"width": 2})
    assert SHAPES.check({"name": "ball", "radius": 0.5}, context=("size",)) == ("ball", {"radius": 0.5})
    # Values are the factory's to judge, when it builds.
    assert SHAPES.check("box(width='wide')") == ("box", {"width": "wide"})


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bxo", "unknown shape 'bxo' (did you mean \"box\"?); valid shapes: ball, box"),
        ("box(widht=2)", "shape 'box' has no argument 'widht' (did you mean \"width\"?); its arguments: width, depth"),
        ("box(size=3)", "shape 'box' has no argument 'size'"),  # a context argument is not the spec's to set
        ("box(", "cannot parse spec 'box('"),
    ],
)
def test_check_and_build_refuse_with_the_same_words(spec, message):
    with pytest.raises(SpecError) as checked:
        SHAPES.check(spec, context=("size",))
    with pytest.raises(SpecError) as built:
        SHAPES.build(spec, size=3)
    assert message in str(checked.value)
    assert str(built.value) == str(checked.value)


def test_build_passes_context_and_leaves_values_to_the_factory():
    assert SHAPES.build("box(width=2)", size=3) == {"size": 3, "width": 2, "depth": 1}
    with pytest.raises(SpecError, match=r"bad shape box\(width=2, depth=-1\): depth must be at least 1"):
        SHAPES.build("box(width=2, depth=-1)", size=3)
