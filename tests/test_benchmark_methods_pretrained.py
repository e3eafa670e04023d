"""The methods grid of the pretrained-student regime (benchmarks/methods/pretrained.py): which recipes the
suffix trainer takes, the headline score, and track b2n's image filter."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers.bench import methods_package

from clipdistill.errors import UserError
from clipdistill.losses.distiller import Distiller
from clipdistill.train.prefix import SuffixTrainConfig, check_recipe


@pytest.fixture(scope="module")
def pretrained():
    with methods_package("bench_methods_p"):
        yield importlib.import_module("bench_methods_p.pretrained")


def test_every_method_of_the_regime_passes_the_suffix_trainers_checks(pretrained):
    assert "no_teacher" in pretrained.methods() and "relational" in pretrained.methods()
    for method in pretrained.methods():
        losses, groups = pretrained.losses_of(method)
        cfg = SuffixTrainConfig(losses=losses, groups=groups or None)
        check_recipe(Distiller(cfg.losses, 8, 8))


def test_excluded_methods_are_the_ones_the_suffix_trainer_refuses(pretrained):
    for method in ("clip_kd_mfd", "dclip"):
        assert method not in pretrained.methods()
        with pytest.raises(UserError):
            check_recipe(Distiller(SuffixTrainConfig(losses=pretrained.recipe(method, {})).losses, 8, 8))
    with pytest.raises(SystemExit, match="not in this regime"):
        pretrained.losses_of("dclip")


def test_headline_score_is_the_mean_retention_of_the_four_figures(pretrained):
    teacher = {
        "cifar10": {"acc1": 0.4},
        "cifar100-916": {"acc1": 0.1},
        "imagenet-1k-sample": {"acc1": 0.05, "acc5": 0.2},
        "flickr8k": {"ret_mean": 0.5},
        "dtd-10": {"acc1": 0.09},
    }
    student = {
        "cifar10": {"acc1": 0.4},
        "cifar100-916": {"acc1": 0.05},
        "imagenet-1k-sample": {"acc1": 0.9, "acc5": 0.1},
        "flickr8k": {"ret_mean": 0.25},
        "dtd-10": {"acc1": 0.9},  # near chance for the teacher: never in the score
    }
    got = pretrained.headline_score(student, teacher)
    assert got["retention"] == pytest.approx(
        {"cifar10": 1.0, "cifar100-916": 0.5, "imagenet_top5": 0.5, "flickr8k_ret_mean": 0.5}
    )
    assert got["score"] == pytest.approx(0.625)


def test_b2n_keeps_only_base_class_images(pretrained):
    labels = torch.tensor([0, 5, 4, 9, 2, 7])
    assert pretrained.base_rows(labels, 10) == [0, 2, 4]


def test_cells_are_named_by_track_setting_method_and_seed(pretrained):
    assert pretrained.cell_name("fd_only", "B", 2) == "B-image-fd_only-s2"
