"""Zero-shot classification (spec section 10): template ensembling, metrics against hand-computed
cases, a perfect and a label-shuffled model end to end, subsampling, skips and the text cache."""

from __future__ import annotations

import json

import pytest
import torch
from fake_clip import class_index, lookup_model, one_hot, perfect_classifier

from clipdistill.errors import UserError
from clipdistill.eval import runner
from clipdistill.eval.zeroshot import (
    class_embeddings,
    class_matrix,
    classification_metrics,
    evaluating,
    fill_templates,
    zeroshot_logits,
)

CLASSES = ("cat", "dog", "bird", "frog", "ship")


def test_class_matrix_normalises_each_prompt_then_the_mean():
    prompts = torch.tensor([[[3.0, 4.0], [10.0, 0.0]], [[0.0, 2.0], [0.0, 5.0]]])
    got = class_matrix(prompts)
    # class 0: (0.6, 0.8) and (1, 0) -> mean (0.8, 0.4) -> / sqrt(0.8) ; class 1: (0, 1)
    expected = torch.tensor([[0.8, 0.4], [0.0, 1.0]])
    expected[0] /= expected[0].norm()
    torch.testing.assert_close(got, expected)


def test_fill_templates_is_class_major_and_rejects_templates_without_placeholder():
    assert fill_templates(["a", "b"], ["x {c}.", "{c}!"]) == ["x a.", "a!", "x b.", "b!"]
    assert fill_templates(["a"], ["{c} {odd} brace"]) == ["a {odd} brace"]
    with pytest.raises(UserError, match="placeholder"):
        fill_templates(["a"], ["no class here"])


def test_classification_metrics_hand_computed():
    # 4 images, 5 classes. Ranks of the true class: 1, 1, 3, 6th-impossible -> 5 (last).
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0],  # target 0, rank 1
            [0.1, 0.9, 0.0, 0.0, 0.0],  # target 1, rank 1
            [0.5, 0.4, 0.3, 0.2, 0.1],  # target 2, rank 3
            [0.5, 0.4, 0.3, 0.2, 0.1],  # target 4, rank 5
        ]
    )
    m = classification_metrics(logits, torch.tensor([0, 1, 2, 4]))
    assert m["acc1"] == pytest.approx(0.5)
    assert m["acc5"] == pytest.approx(1.0)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0 + 0) / 4)


def test_mean_per_class_recall_weights_classes_not_images():
    logits = torch.tensor([[1.0, 0.0]] * 4)  # always predicts class 0
    m = classification_metrics(logits, torch.tensor([0, 0, 0, 1]))
    assert m["acc1"] == pytest.approx(0.75)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert "acc5" not in m  # fewer than 5 classes, as CLIP_benchmark


def test_label_shuffled_logits_score_about_chance():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (3000,), generator=g)
    shuffled = labels[torch.randperm(len(labels), generator=g)]
    m = classification_metrics(
        torch.nn.functional.one_hot(shuffled, 10).float() + 0.01 * torch.rand(3000, 10, generator=g), labels
    )
    assert m["acc1"] == pytest.approx(0.1, abs=0.03)
    assert m["acc5"] == pytest.approx(0.5, abs=0.05)
    assert m["mean_per_class_recall"] == pytest.approx(0.1, abs=0.03)


def test_perfect_model_scores_100(make_dataset):
    root = make_dataset("toy", n=20, classes=CLASSES)
    model = perfect_classifier(root, "toy", CLASSES)
    torch.testing.assert_close(
        class_embeddings(model, CLASSES, ["a photo of a {c}.", "a {c}."]), torch.eye(5)
    )
    rec = runner.evaluate(model, "toy", data_root=root, progress=False)
    assert rec["task"] == "zeroshot_classification" and rec["dataset"] == "toy"
    assert rec["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert rec["clipdistill"]["samples"] == 20 and rec["clipdistill"]["skipped"] == 0
    assert rec["clipdistill"]["seconds"] >= 0
    assert {"model", "pretrained"} <= rec.keys()


def test_label_shuffled_model_scores_about_chance(make_dataset):
    root = make_dataset("toy", n=200, classes=CLASSES)
    g = torch.Generator().manual_seed(1)
    wrong = torch.randint(0, 5, (200,), generator=g)
    model = lookup_model(root, "toy", lambda i, s: one_hot(int(wrong[i]), 5), class_index(CLASSES), 5)
    rec = runner.evaluate(model, "toy", data_root=root, progress=False)
    assert rec["metrics"]["acc1"] == pytest.approx(0.2, abs=0.08)
    assert rec["metrics"]["acc1"] == pytest.approx(sum(int(wrong[i]) == i % 5 for i in range(200)) / 200)


def test_every_subsamples_and_says_so(make_dataset, tmp_path):
    root = make_dataset("toy", n=20, classes=CLASSES)
    model = perfect_classifier(root, "toy", CLASSES)
    out = tmp_path / "res" / "toy.json"
    rec = runner.evaluate(model, "toy", data_root=root, every=3, progress=False, output=out)
    assert rec["clipdistill"]["samples"] == 7 and rec["clipdistill"]["every"] == 3
    assert "1 in 3" in rec["clipdistill"]["subsample"]
    assert json.loads(out.read_text()) == rec
    assert not list(out.parent.glob(".*tmp*"))


def test_corrupt_samples_are_skipped_and_counted(make_dataset):
    root = make_dataset("toy", n=10, classes=CLASSES, corrupt=(3, 7))
    rec = runner.evaluate(perfect_classifier(root, "toy", CLASSES), "toy", data_root=root, progress=False)
    assert rec["clipdistill"]["samples"] == 8 and rec["clipdistill"]["skipped"] == 2
    assert rec["metrics"]["acc1"] == 1.0


def test_class_embeddings_are_cached_per_model_and_recomputed_for_other_weights(make_dataset, tmp_path):
    root = make_dataset("toy", n=5, classes=CLASSES)
    model = perfect_classifier(root, "toy", CLASSES)
    model.spec = "fake:perfect"
    runner.evaluate(model, "toy", data_root=root, progress=False)
    first = model.texts_seen
    assert first == 1 + 2 * 5  # the probe prompt + every template of every class
    files = list((tmp_path / "cache" / "text_embeddings").glob("*.pt"))
    assert len(files) == 1
    runner.evaluate(model, "toy", data_root=root, progress=False)
    assert model.texts_seen == first + 1  # only the probe this time
    with torch.no_grad():
        model.bias.fill_(0.01)  # same spec, other weights: the cache entry must not be used
    runner.evaluate(model, "toy", data_root=root, progress=False)
    assert model.texts_seen == first + 1 + first
    assert len(list((tmp_path / "cache" / "text_embeddings").glob("*.pt"))) == 1


def test_model_without_name_is_not_cached(make_dataset, tmp_path):
    root = make_dataset("toy", n=5, classes=CLASSES)
    runner.evaluate(perfect_classifier(root, "toy", CLASSES), "toy", data_root=root, progress=False)
    assert not (tmp_path / "cache" / "text_embeddings").exists()


def test_evaluation_restores_training_mode(make_dataset):
    root = make_dataset("toy", n=5, classes=CLASSES)
    model = perfect_classifier(root, "toy", CLASSES).train()
    with evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    runner.evaluate(model, "toy", data_root=root, progress=False)
    assert model.training


def test_zeroshot_logits_are_cosine_similarities():
    img = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    cls = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    torch.testing.assert_close(zeroshot_logits(img, cls), torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]]))


def test_split_spec_names_model_and_weights():
    assert runner.split_spec("openclip:ViT-B-32/laion2b_s34b_b79k") == (
        "openclip:ViT-B-32",
        "laion2b_s34b_b79k",
    )
    assert runner.split_spec("student:vit-t-32@/ck/last.pt") == ("student:vit-t-32", "/ck/last.pt")
    assert runner.split_spec("teacher:/t/dir") == ("teacher", "/t/dir")
    assert runner.split_spec("hf:openai/clip-vit-base-patch32") == ("hf", "openai/clip-vit-base-patch32")
    assert runner.split_spec("student:vit-t-32") == ("student:vit-t-32", "random")
