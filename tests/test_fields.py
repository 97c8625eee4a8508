"""The data fields a structure consumes beside x (pyro_vae.fields): observed labels, quadrant masks, their errors."""

from __future__ import annotations

import pytest
import torch

from pyro_vae.data import load_dataset
from pyro_vae.evaluate import chunks
from pyro_vae.fields import HIDDEN, attach_fields, check_provided, observed_labels, quadrant_mask, split_fields


def _labels(n_per_class: int = 30, classes: int = 10) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(n_per_class)[torch.randperm(n_per_class * classes)]


def test_observed_labels_keep_a_balanced_subset_fixed_by_the_seed():
    torch.manual_seed(0)
    labels = _labels()
    observed = observed_labels(labels, 23, seed=5)
    kept = observed != HIDDEN
    assert int(kept.sum()) == 23
    assert torch.equal(observed[kept], labels[kept])  # a kept label is the true one
    counts = torch.bincount(observed[kept], minlength=10)
    assert counts.tolist() == [3, 3, 3] + [2] * 7  # 23 = 10 * 2 + 3: the remainder goes to the first classes
    assert torch.equal(observed, observed_labels(labels, 23, seed=5))
    assert not torch.equal(observed, observed_labels(labels, 23, seed=6))


def test_observed_labels_none_keeps_every_label_and_zero_hides_them_all():
    labels = _labels(3)
    assert torch.equal(observed_labels(labels, None, seed=0), labels)
    assert (observed_labels(labels, 0, seed=0) == HIDDEN).all()


def test_more_labels_than_a_class_holds_is_one_line():
    lopsided = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, 10).repeat_interleave(5)])
    with pytest.raises(ValueError, match="asks for 2 examples of class 0, which has 1"):
        observed_labels(lopsided, 20, seed=0)
    with pytest.raises(ValueError, match="more than the 30 training examples"):
        observed_labels(_labels(3), 31, seed=0)


def test_quadrant_masks_follow_pyros_cvae_example():
    # 1: bottom-left given; 2: the left half; 3: all but the bottom-right (examples/cvae/mnist.py).
    expected = {
        1: [[0, 0], [1, 0]],
        2: [[1, 0], [1, 0]],
        3: [[1, 1], [1, 0]],
    }
    for quadrants, blocks in expected.items():
        mask = quadrant_mask((1, 4, 4), quadrants).reshape(4, 4)
        want = torch.tensor(blocks, dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1)
        assert torch.equal(mask, want), quadrants
    rgb = quadrant_mask((3, 4, 4), 1).reshape(3, 4, 4)
    assert all(torch.equal(rgb[c], rgb[0]) for c in range(3))  # every channel of a given pixel is given
    with pytest.raises(ValueError, match="quadrants must be 1, 2 or 3"):
        quadrant_mask((1, 4, 4), 0)


def test_attach_fields_gives_every_split_its_rows_and_hides_evaluation_labels():
    dataset = attach_fields(load_dataset("synthetic"), labels=20, quadrants=2, seed=0)
    for split in ("train", "val", "test"):
        x = getattr(dataset, split)
        fields = split_fields(dataset, split, ("labels", "input_mask"))
        assert fields["labels"].shape == (len(x),) and fields["input_mask"].shape == x.shape
    assert int((dataset.fields["labels"]["train"] != HIDDEN).sum()) == 20
    assert (dataset.fields["labels"]["val"] == HIDDEN).all() and (dataset.fields["labels"]["test"] == HIDDEN).all()
    assert dataset.test_labels is not None and (dataset.test_labels >= 0).all()  # the truth stays for accuracies
    assert split_fields(dataset, "train", ()) == {}


def test_a_structure_consuming_a_missing_field_is_told_how_to_provide_it():
    dataset = attach_fields(load_dataset("synthetic"))
    check_provided(dataset, ("labels",), structure="m2")  # synthetic has labels
    with pytest.raises(ValueError, match=r"structure 'cvae' consumes the data field 'input_mask'.*data.quadrants"):
        check_provided(dataset, ("input_mask",), structure="cvae")
    dataset.train_labels = None
    with pytest.raises(ValueError, match="has no labels"):
        attach_fields(dataset, labels=10)


def test_evaluation_chunks_cut_the_fields_row_for_row():
    x = torch.arange(7.0).unsqueeze(-1)
    data = {"labels": torch.arange(7) * 2}
    parts = list(chunks(x, data, 3))
    assert [len(xb) for xb, _ in parts] == [3, 3, 1]
    assert all(torch.equal(db["labels"], xb.squeeze(-1).long() * 2) for xb, db in parts)


def test_labelled_rows_repeat_with_their_fields_and_the_rest_stay_once():
    plain = attach_fields(load_dataset("synthetic"), labels=20, quadrants=1, seed=0)
    dataset = attach_fields(load_dataset("synthetic"), labels=20, quadrants=1, seed=0, labelled_repeats=4)
    n = len(plain.train)
    assert len(dataset.train) == n + 3 * 20 and len(dataset.fields["input_mask"]["train"]) == len(dataset.train)
    observed = dataset.fields["labels"]["train"]
    assert int((observed != HIDDEN).sum()) == 4 * 20
    assert torch.equal(dataset.train[:n], plain.train) and torch.equal(observed[:n], plain.fields["labels"]["train"])
    copies = dataset.train[n:]  # each labelled image, with its label, three more times
    kept = (plain.fields["labels"]["train"] != HIDDEN).nonzero().flatten()
    assert torch.equal(copies, plain.train[kept].repeat(3, 1)) and torch.equal(dataset.train_labels[n:], observed[n:])
    assert len(dataset.val) == len(plain.val)  # evaluation sets are untouched
    with pytest.raises(ValueError, match="needs labels"):
        attach_fields(
            load_dataset("synthetic").__class__(**{**vars(load_dataset("synthetic")), "train_labels": None}),
            labelled_repeats=2,
        )
