"""The data fields a model structure consumes beside x (``Structure.consumes``), made from ``[data]``.

A structure's Pyro programs take them as keyword arguments (``model(x, beta, labels=...)``); the
training loop slices them with the same indices as x, and evaluation passes them chunk by chunk.
Each field is a tensor per split with one row per example, on the data's device:

================  ========================================================  ==========================
field             per example                                               made when
================  ========================================================  ==========================
``labels``        the class label the model observes; -1 where it is        the variant has labels;
                  hidden. Training: ``data.labels`` of them, balanced       ``data.labels`` (None: all)
                  over classes; validation and test: all hidden, so the
                  bound there is a bound on log p(x)
``input_mask``    True on the pixels a conditional model is given           ``data.quadrants = 1|2|3``
                  (Pyro's ``examples/cvae`` quadrants), the same for
                  every example
================  ========================================================  ==========================

The true labels of every split stay in ``dataset.{split}_labels`` (for accuracies and plots).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyro_vae.data import Dataset

HIDDEN = -1  # the value of a label the model does not observe

# What to set when a structure consumes a field the data does not provide.
HOW_TO_PROVIDE = {
    "labels": "use a data set with labels (mnist, mnist-dynamic, fashion-mnist, cifar10; mnist-static has none)",
    "input_mask": "set data.quadrants = 1, 2 or 3 (the quadrants of each image given as input)",
}

SPLITS = ("train", "val", "test")


def observed_labels(labels: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """``labels`` with all but ``count`` of them set to :data:`HIDDEN`; ``None`` keeps every one.

    The kept ones are balanced over the classes (``count // classes`` each, the remainder to the
    first classes), drawn with a CPU generator seeded by ``seed``: the same examples on every device
    (Kingma et al. 2014, section 4.1: the labelled subset is balanced).
    """
    if count is None:
        return labels.clone()
    classes = int(labels.max()) + 1 if len(labels) else 0
    if count > len(labels):
        raise ValueError(f"data.labels = {count} is more than the {len(labels)} training examples")
    generator = torch.Generator().manual_seed(seed)
    host = labels.cpu()
    keep = []
    for c in range(classes):
        members = (host == c).nonzero().flatten()
        want = count // classes + (1 if c < count % classes else 0)
        if want > len(members):
            raise ValueError(f"data.labels = {count} asks for {want} examples of class {c}, which has {len(members)}")
        keep.append(members[torch.randperm(len(members), generator=generator)[:want]])
    observed = torch.full_like(host, HIDDEN)
    index = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)
    observed[index] = host[index]
    return observed.to(labels.device)


def quadrant_mask(image_shape: Sequence[int], quadrants: int) -> torch.Tensor:
    """The input pixels of Pyro's CVAE task (``examples/cvae``), flattened channel-first, shape ``(D,)``.

    1: the bottom-left quadrant; 2: the left half; 3: every quadrant but the bottom-right. The rest
    of the image is what the model predicts.
    """
    if quadrants not in (1, 2, 3):
        raise ValueError(f"quadrants must be 1, 2 or 3, got {quadrants!r}")
    channels, height, width = image_shape
    given = torch.zeros(height, width, dtype=torch.bool)
    given[height // 2 :, : width // 2] = True
    if quadrants >= 2:
        given[:, : width // 2] = True
    if quadrants == 3:
        given[: height // 2, :] = True
    return given.expand(channels, height, width).reshape(-1)


def attach_fields(
    dataset: Dataset,
    labels: int | None = None,
    quadrants: int | None = None,
    seed: int = 0,
    labelled_repeats: int = 1,
) -> Dataset:
    """Add the fields ``[data]`` asks for to ``dataset.fields`` (in place; returns it); with
    ``labelled_repeats`` > 1, the training rows whose label is observed appear that many times per
    epoch (:func:`repeat_labelled`)."""
    if dataset.train_labels is not None:
        hidden = {split: torch.full_like(getattr(dataset, f"{split}_labels"), HIDDEN) for split in ("val", "test")}
        dataset.fields["labels"] = {"train": observed_labels(dataset.train_labels, labels, seed), **hidden}
    elif labels is not None:
        raise ValueError(f"data.labels = {labels}, but {dataset.name} has no labels; {HOW_TO_PROVIDE['labels']}")
    if quadrants is not None:
        mask = quadrant_mask(dataset.image_shape, quadrants).to(dataset.device)
        dataset.fields["input_mask"] = {split: mask.expand(len(getattr(dataset, split)), -1) for split in SPLITS}
    if labelled_repeats > 1:
        repeat_labelled(dataset, labelled_repeats)
    return dataset


def repeat_labelled(dataset: Dataset, repeats: int) -> None:
    """Append ``repeats - 1`` copies of every training row whose label is observed (x, its grey levels
    for a dynamic binarization, its labels and every field), so that an epoch shows each labelled
    example ``repeats`` times.

    With 100 labels among 50 000 images a batch of 200 holds 0.4 labelled rows on average: the
    labelled bound and the classification term reach the networks as a trace in the noise of the
    unlabelled ones. Repeating them weights the labelled part of the objective by ``repeats``
    (Kingma et al. 2014 draw a labelled and an unlabelled part for every minibatch; their objective
    weighs the two sets by their sizes only through alpha).
    """
    if "labels" not in dataset.fields:
        raise ValueError(f"data.labelled_repeats needs labels; {HOW_TO_PROVIDE['labels']}")
    observed = (dataset.fields["labels"]["train"] != HIDDEN).nonzero().flatten()
    rows = torch.cat([torch.arange(len(dataset.train), device=observed.device), observed.repeat(repeats - 1)])
    dataset.train = dataset.train[rows]
    for name in ("train_labels", "train_probs"):
        if getattr(dataset, name) is not None:
            setattr(dataset, name, getattr(dataset, name)[rows])
    for field in dataset.fields.values():
        field["train"] = field["train"][rows]


def check_provided(dataset: Dataset, consumes: Sequence[str], structure: str) -> None:
    """A one-line ``ValueError`` when ``dataset`` lacks a field the structure consumes, saying how to provide it."""
    for name in consumes:
        if name not in dataset.fields:
            how = HOW_TO_PROVIDE.get(name, "no [data] setting makes it")
            raise ValueError(
                f"structure {structure!r} consumes the data field {name!r}, which {dataset.name} lacks: {how}"
            )


def split_fields(dataset, split: str, consumes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The consumed fields of one split, by name (``{}`` for a structure that consumes none)."""
    fields = getattr(dataset, "fields", {})
    return {name: fields[name][split] for name in consumes}
