"""Base-to-novel generalisation: the deterministic, disjoint split; hand-computed base, novel and HM
on a synthetic model with known per-class accuracy; the `classes=base` data filter over whole shards."""

from __future__ import annotations

import pytest
import torch
from fake_clip import class_index, lookup_model, one_hot

from clipdistill.data.filter import parse_data_filter, split_classes
from clipdistill.data.shards import dataset_info, iter_samples
from clipdistill.errors import UserError
from clipdistill.eval import runner
from clipdistill.eval.base2novel import base2novel_metrics, harmonic_mean

CLASSES = ("cat", "dog", "bird", "frog")  # base: cat, dog; novel: bird, frog
# Per class: how many of its 10 images are right. A wrong image points at the other class of its own
# half; a right one leans towards the other half too (0.6 there, 0.4 on its own class): counted right,
# because base images compete against base prompts only (and novel against novel).
CORRECT = {0: 10, 1: 6, 2: 5, 3: 3}
OTHER_IN_HALF = {0: 1, 1: 0, 2: 3, 3: 2}
OTHER_HALF = {0: 2, 1: 3, 2: 0, 3: 1}


def _vector(label: int, j: int) -> torch.Tensor:
    """The j-th image of class `label` (j = 0..9)."""
    if j < CORRECT[label]:
        return 0.4 * one_hot(label, 4) + 0.6 * one_hot(OTHER_HALF[label], 4)
    return one_hot(OTHER_IN_HALF[label], 4)


def test_split_is_first_half_in_dataset_order():
    assert split_classes(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert split_classes(5) == ([0, 1, 2], [3, 4])  # CoOp: base gets ceil(C / 2)
    assert split_classes(2) == ([0], [1])
    with pytest.raises(UserError):
        split_classes(1)


@pytest.mark.parametrize("n", [2, 7, 10, 100])
@pytest.mark.parametrize("seed", [None, 0, 3])
def test_split_is_deterministic_disjoint_and_covering(n, seed):
    base, novel = split_classes(n, seed)
    assert (base, novel) == split_classes(n, seed)
    assert not set(base) & set(novel)
    assert sorted(base + novel) == list(range(n))
    assert len(base) == (n + 1) // 2


def test_seeded_split_differs_from_the_default_and_between_seeds():
    assert split_classes(10, 0) != split_classes(10)
    assert split_classes(10, 0) != split_classes(10, 1)


def test_hand_computed_base_novel_hm():
    labels = torch.tensor([c for c in range(4) for _ in range(10)])
    images = torch.stack([_vector(c, j) for c in range(4) for j in range(10)])
    m = base2novel_metrics(images, labels, torch.eye(4), [0, 1], [2, 3])
    assert m["base_acc1"] == pytest.approx(16 / 20)
    assert m["novel_acc1"] == pytest.approx(8 / 20)
    assert m["hm"] == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    # Against all four prompts, the leaning images would be wrong: restriction is what is measured.
    assert (torch.eye(4)[(images @ torch.eye(4)).argmax(1)].argmax(1) == labels).float().mean() == 0


def test_harmonic_mean():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(1.0, 0.0) == 0.0


def test_end_to_end_record(make_dataset):
    root = make_dataset("toy", n=40, classes=CLASSES)  # label of sample i: i % 4
    model = lookup_model(root, "toy", lambda i, s: _vector(s.label, i // 4), class_index(CLASSES), 4)
    rec = runner.evaluate(model, "toy", task="base2novel", data_root=root, batch_size=7, progress=False)
    assert rec["task"] == "base2novel"
    assert rec["metrics"] == pytest.approx({"base_acc1": 0.8, "novel_acc1": 0.4, "hm": 0.8 * 0.4 * 2 / 1.2})
    assert rec["clipdistill"]["base_classes"] == ["cat", "dog"]
    assert rec["clipdistill"]["novel_classes"] == ["bird", "frog"]


def test_seeded_end_to_end_uses_the_seeded_split(make_dataset):
    root = make_dataset("toy", n=8, classes=CLASSES)
    model = lookup_model(root, "toy", lambda i, s: one_hot(s.label, 4), class_index(CLASSES), 4)
    rec = runner.evaluate(model, "toy", task="base2novel", data_root=root, split_seed=5, progress=False)
    base, novel = split_classes(4, 5)
    assert rec["clipdistill"]["base_classes"] == [CLASSES[i] for i in base]
    assert rec["clipdistill"]["split_seed"] == 5
    assert rec["metrics"]["hm"] == 1.0


def test_data_filter_parses_halves_names_and_indices(make_dataset):
    info = dataset_info("toy", make_dataset("toy", n=4, classes=CLASSES))
    assert parse_data_filter("classes=base", info) == {0, 1}
    assert parse_data_filter("classes=novel", info) == {2, 3}
    assert parse_data_filter("classes=base", info, split_seed=5) == set(split_classes(4, 5)[0])
    assert parse_data_filter("classes=frog,0", info) == {3, 0}
    assert parse_data_filter(None, info) is None and parse_data_filter("", info) is None
    with pytest.raises(UserError, match="did you mean 'frog'"):
        parse_data_filter("classes=frgo", info)
    with pytest.raises(UserError, match="unknown data filter"):
        parse_data_filter("labels=base", info)
    with pytest.raises(UserError, match="out of range"):
        parse_data_filter("classes=9", info)


def test_data_filter_needs_a_classification_dataset(make_dataset):
    info = dataset_info("caps", make_dataset("caps", kind="retrieval", n=2))
    with pytest.raises(UserError, match="classification"):
        parse_data_filter("classes=base", info)


def test_classes_base_never_yields_a_novel_image(make_dataset):
    classes = [f"class{i}" for i in range(10)]
    root = make_dataset("ten", n=97, classes=classes, shards=3, split="train")
    info = dataset_info("ten", root)
    every = list(iter_samples(info.shards("train")))
    for seed in (None, 1):
        keep = parse_data_filter("classes=base", info, split_seed=seed)
        kept = list(iter_samples(info.shards("train"), labels=keep))
        assert kept and all(s.label in keep for s in kept)
        assert [s.key for s in kept] == [s.key for s in every if s.label in keep]  # nothing else dropped
        novel = parse_data_filter("classes=novel", info, split_seed=seed)
        assert not keep & novel and len(keep | novel) == 10
