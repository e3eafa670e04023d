"""Linear probe: 100% on linearly separable features, about chance on shuffled labels, the held-out C
selection, and the runner end to end with its per-model feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_clip import perfect_classifier

from clipdistill.errors import UserError
from clipdistill.eval import runner
from clipdistill.eval.linear_probe import (
    ProbeConfig,
    fit_probe,
    holdout_split,
    linear_probe,
    probe_logits,
    select_c,
)

CLASSES = ("cat", "dog", "bird", "frog", "ship")
FAST = ProbeConfig(c_grid=(0.1, 10.0, 1000.0), max_iter=300)


def _separable(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    centres = 3 * torch.eye(k, 16)
    return centres[labels] + 0.3 * torch.randn(n, 16, generator=g), labels


def test_separable_features_reach_100():
    xtr, ytr = _separable(200, 4, 0)
    xte, yte = _separable(100, 4, 1)
    res = linear_probe(xtr, ytr, xte, yte, config=FAST)
    assert res.metrics["acc1"] == 1.0 and res.metrics["mean_per_class_recall"] == 1.0
    assert "acc5" not in res.metrics
    assert res.n_train == 200 and res.n_test == 100 and res.val_acc1 == 1.0


def test_shuffled_labels_score_about_chance():
    g = torch.Generator().manual_seed(2)
    xtr, ytr = torch.randn(300, 16, generator=g), torch.randint(0, 4, (300,), generator=g)
    xte, yte = torch.randn(400, 16, generator=g), torch.randint(0, 4, (400,), generator=g)
    res = linear_probe(xtr, ytr, xte, yte, config=FAST)
    assert res.metrics["acc1"] == pytest.approx(0.25, abs=0.08)
    assert res.metrics["mean_per_class_recall"] == pytest.approx(0.25, abs=0.08)


def test_same_features_shuffled_labels_lose_the_signal():
    xtr, ytr = _separable(200, 4, 0)
    xte, yte = _separable(200, 4, 1)
    g = torch.Generator().manual_seed(3)
    res = linear_probe(xtr, ytr[torch.randperm(200, generator=g)], xte, yte, config=FAST)
    assert res.metrics["acc1"] == pytest.approx(0.25, abs=0.1)


def test_holdout_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), 25)
    fit, val = holdout_split(y, 0.2, seed=0)
    assert len(val) == 20 and not set(fit) & set(val) and len(fit) + len(val) == 100
    assert np.bincount(y[val]).tolist() == [5, 5, 5, 5]
    assert (fit == holdout_split(y, 0.2, seed=0)[0]).all()
    assert not (val == holdout_split(y, 0.2, seed=1)[1]).all()


def test_select_c_refines_around_the_best_grid_value():
    x, y = _separable(120, 3, 0)
    xs = torch.nn.functional.normalize(x, dim=-1).numpy()
    best, scores = select_c(xs, y.numpy(), ProbeConfig(c_grid=(1e-4, 1.0), max_iter=300))
    grid_best = max((1e-4, 1.0), key=lambda c: (scores[c], -c))
    assert set(scores) == {1e-4, 1.0, grid_best * 10**-0.5, grid_best * 10**0.5}
    assert scores[best] == max(scores.values()) and best == min(
        c for c, s in scores.items() if s == scores[best]
    )


def test_probe_logits_cover_classes_missing_from_train():
    x, y = _separable(60, 2, 0)
    clf = fit_probe(x.numpy(), y.numpy(), 1.0)
    logits = probe_logits(clf, x.numpy(), n_classes=3)
    assert logits.shape == (60, 3) and torch.isinf(logits[:, 2]).all()
    assert (logits.argmax(1) == y).all()


def test_one_class_train_is_a_user_error():
    x = torch.randn(20, 4)
    with pytest.raises(UserError):
        linear_probe(x, torch.zeros(20, dtype=torch.long), x, torch.zeros(20, dtype=torch.long), config=FAST)


def test_runner_end_to_end_with_feature_cache(make_dataset, tmp_path):
    make_dataset("toy", n=40, classes=CLASSES, split="train")
    root = make_dataset("toy", n=15, classes=CLASSES, split="test")
    model = perfect_classifier(root, "toy", CLASSES, splits=("train", "test"))
    model.spec = "fake:perfect"
    rec = runner.evaluate(
        model, "toy", task="linear_probe", data_root=root, probe_config=FAST, progress=False
    )
    assert rec["task"] == "linear_probe"
    assert rec["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    extra = rec["clipdistill"]
    assert (
        extra["samples"] == 15 and extra["probe"]["train_samples"] == 40 and extra["train_split"] == "train"
    )
    assert f"{extra['probe']['C']:g}" in extra["probe"]["val_scores"] and extra["probe"]["val_acc1"] == 1.0
    assert len(list((tmp_path / "cache" / "image_features").glob("*.pt"))) == 2
    seen = model.images_seen
    assert seen == 40 + 15 + 2  # both splits + one probe image per split
    again = runner.evaluate(
        model, "toy", task="linear_probe", data_root=root, probe_config=FAST, progress=False
    )
    assert model.images_seen == seen + 2  # features from the cache, only the probes ran
    assert again["metrics"] == rec["metrics"]
    runner.evaluate(
        model,
        "toy",
        task="linear_probe",
        data_root=root,
        every=2,
        train_every=4,
        probe_config=FAST,
        progress=False,
        cache=False,
    )
    assert model.images_seen == seen + 2 + 10 + 8


def test_runner_needs_a_train_split(make_dataset):
    root = make_dataset("toy", n=5, classes=CLASSES)
    with pytest.raises(UserError, match="no split 'train'"):
        runner.evaluate(perfect_classifier(root, "toy", CLASSES), "toy", task="linear_probe", data_root=root)
