"""docs/results/reproductions.json against the run folders it cites (docs/results/runs/NAME/).

Every row has the keys issue 18 names; a row that reports a number has a committed run whose
evaluation.json and metrics.jsonl give exactly that number, SE, protocol and epoch count, and
whose folder holds the small artefacts (resolved config, metrics, evaluation with the per-example
log p(x), figures). A hand-edited number that no run backs fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = json.loads((REPO / "docs/results/reproductions.json").read_text())
KEYS = {
    "recipe",
    "source",
    "published_nll",
    "obtained_nll",
    "se",
    "num_examples",
    "nll_samples",
    "epochs",
    "run",
    "command",
}
ARTEFACTS = ("config.toml", "metrics.jsonl", "evaluation.json", "evaluation.npz", "learning_curves.png", "samples.png")


def test_every_row_has_the_issue_keys_and_a_recipe_that_exists():
    for row in ROWS:
        assert set(row) >= KEYS, f"{row['recipe']}: missing {sorted(KEYS - set(row))}"
        assert (REPO / row["recipe"]).is_file(), row["recipe"]


@pytest.mark.parametrize("row", [r for r in ROWS if r["run"]], ids=lambda r: r["run"].rsplit("/", 1)[-1])
def test_a_reported_number_is_the_committed_runs(row):
    run = REPO / row["run"]
    missing = [name for name in ARTEFACTS if not (run / name).is_file()]
    assert not missing, f"{row['run']}: missing {missing}"
    evaluation = json.loads((run / "evaluation.json").read_text())
    epochs = sum(1 for line in (run / "metrics.jsonl").open() if line.strip())
    assert row["obtained_nll"] == round(evaluation["test_nll"], 2)
    assert row["se"] == round(evaluation["test_nll_data_se"], 2)
    assert (row["num_examples"], row["nll_samples"], row["epochs"]) == (
        evaluation["num_examples"],
        evaluation["nll_samples"],
        epochs,
    )
    log_px = np.load(run / "evaluation.npz")["log_px"]
    assert log_px.shape == (row["num_examples"],)
    assert abs(-float(log_px.mean()) - row["obtained_nll"]) < 0.005
