"""Short-run anchors of the paper recipes (configs/paper/): the first minutes of each, checked against
a band, so that a change which silently hurts training fails CI long before anyone reruns a paper.

Each anchor runs its recipe unchanged except for the overrides below (fewer epochs, a training
subset, no NLL or figures) and checks the last epoch's validation bound against the band in
``paper_anchors.json``: the mean over seeds 0-3 of the same short run +- 5 sd of those seeds (the
seed-to-seed noise of the recipe; the test runs the recipe's own seed). The pythae recipe's anchor
is its long run's first two epochs on the full data, and the test also checks that the long run
committed under docs/results/runs/pythae_vae/ recorded a value inside the band.

Record the bands again (after a deliberate change to training) with

    PYRO_VAE_DATA=../shared/data OMP_NUM_THREADS=1 python tests/test_paper_anchors.py --record [RECIPE ...]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANCHORS_FILE = Path(__file__).with_name("paper_anchors.json")
COMMON = ["train.nll_samples=0", "train.plots=false", "train.device=cpu", "train.threads=1"]
# recipe -> overrides of its short run (about 10-40 s each on one CPU thread)
ANCHORS = {
    "pythae_vae": ["train.epochs=2"],
    "burda_vae": ["data.subset=4000", "train.epochs=2"],
    "burda_iwae_k5": ["data.subset=4000", "train.epochs=2"],
    "burda_iwae_k50": ["data.subset=2000", "train.epochs=2"],
    "tomczak_standard": ["data.subset=5000", "train.epochs=3"],
    "tomczak_vamp": ["data.subset=5000", "train.epochs=3"],
}
RECORD_SEEDS = (0, 1, 2, 3)
BAND_SDS = 5.0


def short_run(recipe: str, out_dir: Path, data_dir: Path, seed: int | None = None) -> float:
    """The last epoch's validation bound (the recipe's estimator's: the ELBO, or the IWAE bound) of its short run.

    Not the ELBO for IWAE: an IWAE-trained q(z|x) is a proposal, not an ELBO-maximizer, and its ELBO
    after two epochs swings by hundreds of nats between seeds while its bound does not.
    """
    from pyro_vae.checks import load_config
    from pyro_vae.train import train

    overrides = [*ANCHORS[recipe], *COMMON, *([f"train.seed={seed}"] if seed is not None else [])]
    cfg = load_config(REPO / "configs" / "paper" / f"{recipe}.toml", overrides)
    result = train(cfg, out_dir, data_dir=data_dir, progress=False)
    return float(result["metrics"]["val_bound"])


@pytest.fixture(scope="module")
def anchors() -> dict:
    return json.loads(ANCHORS_FILE.read_text())


def test_every_recipe_has_an_anchor(anchors):
    recipes = {p.stem for p in (REPO / "configs" / "paper").glob("*.toml")}
    assert recipes == set(ANCHORS) == set(anchors)
    for recipe, entry in anchors.items():
        assert entry["overrides"] == ANCHORS[recipe], f"{recipe}: record the band again (--record)"


@pytest.mark.parametrize("recipe", sorted(ANCHORS))
def test_the_first_minutes_of_each_recipe_land_in_their_band(recipe, anchors, data_root, tmp_path):
    low, high = anchors[recipe]["band"]
    value = short_run(recipe, tmp_path / "run", data_root)
    assert low <= value <= high, f"{recipe}: validation bound {value:.2f} outside its band [{low:.2f}, {high:.2f}]"


def test_the_pythae_long_run_started_inside_its_anchor(anchors):
    """The committed long run (same recipe, same seed, full data) passed through the band at epoch 2."""
    records = [json.loads(line) for line in (REPO / "docs/results/runs/pythae_vae/metrics.jsonl").open()]
    low, high = anchors["pythae_vae"]["band"]
    assert low <= records[1]["val_bound"] <= high


def record(data_dir: Path, recipes) -> dict:
    """Run the anchors of ``recipes`` for each of ``RECORD_SEEDS`` and return their bands."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            values = [short_run(recipe, Path(tmp) / f"{recipe}-{s}", data_dir, seed=s) for s in RECORD_SEEDS]
            mean, sd = statistics.mean(values), statistics.stdev(values)
            out[recipe] = {
                "overrides": ANCHORS[recipe],
                "seeds": list(RECORD_SEEDS),
                "val_bound": values,
                "band": [mean - BAND_SDS * sd, mean + BAND_SDS * sd],
            }
            print(recipe, [round(v, 2) for v in values], [round(b, 2) for b in out[recipe]["band"]], flush=True)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or not set(sys.argv[2:]) <= set(ANCHORS):
        sys.exit(f"usage: python tests/test_paper_anchors.py --record [RECIPE ...] (recipes: {', '.join(ANCHORS)})")
    sys.path.insert(0, str(REPO))
    from conftest import _data_root

    bands = json.loads(ANCHORS_FILE.read_text()) if ANCHORS_FILE.exists() else {}
    bands.update(record(_data_root(), sys.argv[2:] or list(ANCHORS)))
    ANCHORS_FILE.write_text(json.dumps({name: bands[name] for name in ANCHORS}, indent=1) + "\n")
