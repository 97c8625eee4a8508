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
``mask``          True on the pixels that are observed (missing data,       ``data.missing = SPEC``
                  ``pyro_vae.masks``): one mask per example, drawn once     (``mcar(rate=0.5)``,
                  from ``train.seed``, each split from its own seed          ``squares(size=14)``)
================  ========================================================  ==========================

Masks are ``(N, D)`` bool, D the flattened pixels in channel-first order. The ``mask`` field must be
consumed: a structure that ignores it would train on the very pixels the data say are missing
(:data:`MUST_CONSUME`).

The true labels of every split stay in ``dataset.{split}_labels`` (for accuracies and plots).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyro_vae.data import Dataset
from pyro_vae.masks import draw_masks, split_seed
from pyro_vae.specs import Spec

HIDDEN = -1  # the value of a label the model does not observe

# What to set when a structure consumes a field the data does not provide.
HOW_TO_PROVIDE = {
    "labels": "use a data set with labels (mnist, mnist-dynamic, fashion-mnist, cifar10; mnist-static has none)",
    "input_mask": "set data.quadrants = 1, 2 or 3 (the quadrants of each image given as input)",
    "mask": 'set data.missing = "mcar(rate=0.5)" or "squares(size=14)" (the pixels of each image that are missing)',
}

# Fields a structure must consume when the data have them, and what to do instead.
MUST_CONSUME = {
    "mask": 'data.missing is set: use model.structure = "miwae", whose model observes only the observed pixels',
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
    missing: Spec | None = None,
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
    if missing is not None:
        dataset.fields["mask"] = {split: missing_mask(dataset, split, missing, seed) for split in SPLITS}
    if labelled_repeats > 1:
        repeat_labelled(dataset, labelled_repeats)
    return dataset


def missing_mask(dataset: Dataset, split: str, spec: Spec, seed: int, key: str = "data.missing") -> torch.Tensor:
    """The masks of one split (``(N, D)`` bool, True = observed) for the pattern ``spec``, drawn on the CPU from
    ``seed`` and the split's name (``pyro_vae.masks.split_seed``) and moved to the data's device. A bad spec is
    one ``ValueError`` line naming ``key``, the setting it came from."""
    x = getattr(dataset, split)
    try:
        masks = draw_masks(spec, dataset.image_shape, len(x), split_seed(seed, split))
    except ValueError as err:
        raise ValueError(f"{key} = {spec!r}: {err}") from None
    return masks.to(x.device)


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
    """A one-line ``ValueError`` when ``dataset`` lacks a field the structure consumes, saying how to provide it,
    or has one the structure must consume and does not (:data:`MUST_CONSUME`), saying what to use."""
    for name in consumes:
        if name not in dataset.fields:
            how = HOW_TO_PROVIDE.get(name, "no [data] setting makes it")
            raise ValueError(
                f"structure {structure!r} consumes the data field {name!r}, which {dataset.name} lacks: {how}"
            )
    for name, instead in MUST_CONSUME.items():
        if name in dataset.fields and name not in consumes:
            raise ValueError(f"structure {structure!r} does not consume the data field {name!r}; {instead}")


def split_fields(dataset, split: str, consumes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The consumed fields of one split, by name (``{}`` for a structure that consumes none)."""
    fields = getattr(dataset, "fields", {})
    return {name: fields[name][split] for name in consumes}
