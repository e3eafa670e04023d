"""Run config: YAML + dotted overrides into typed dataclasses; every mistake is a one-line UserError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clipdistill.data.augment import AugmentPolicy
from clipdistill.errors import UserError
from clipdistill.losses.config import LossConfig
from clipdistill.train.config import TrainConfig, apply_overrides, config_from_dict, load_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = {"teacher": {"cache": "runs/cache"}, "steps": 10}


def test_defaults_overrides_and_types():
    cfg = config_from_dict(
        BASE,
        [
            "optim.lr=5e-4",
            "data.batch_size=64",
            "optim.betas=[0.9,0.95]",
            "eval.every=5",
            "optim.grad_clip=null",
            "student.spec=student:vit-t-64",
        ],
    )
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.data.batch_size, int) and cfg.data.batch_size == 64
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.grad_clip is None and cfg.eval.every == 5
    assert cfg.teacher_mode == "cached" and cfg.student.spec == "student:vit-t-64"
    assert cfg.losses.weights == {"clip": 1.0}
    assert config_from_dict({"optim": {"lr": "1e-3"}, "steps": 1}).optim.lr == 1e-3  # YAML's 1e-3 is a string
    assert config_from_dict({"steps": 1}).teacher_mode == "none"


def test_merging_a_run_config_with_a_loss_recipe(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({**BASE, "losses": {"clip": 1.0, "kd": 1.0}, "optim": {"lr": 2e-3}}))
    cfg = load_configs([run, CONFIGS / "clip_kd.yaml"], ["optim.weight_decay=0.2"])
    assert set(cfg.losses.weights) == {"clip", "crd", "icl", "fd"}  # the recipe replaces losses whole
    assert cfg.optim.lr == 2e-3 and cfg.optim.weight_decay == 0.2
    assert cfg.optim.groups == {"distiller": {"weight_decay": 0.01}}  # the recipe's optim.groups merge in
    assert cfg.to_dict()["losses"]["fd"] == 2000.0


def test_sections_are_parsed_once_and_recorded_as_written(monkeypatch):
    from clipdistill.train import config_io

    calls = []
    for tp, parse in list(config_io.PARSED.items()):
        monkeypatch.setitem(
            config_io.PARSED, tp, lambda v, path, parse=parse: calls.append(path) or parse(v, path)
        )
    losses = {"clip": 1, "fd": {"weight": "2e3", "form": "mse"}}
    cfg = config_from_dict({**BASE, "losses": losses, "data": {"augment": {"flip": 0, "scale": [0.3, 1]}}})
    assert sorted(calls) == ["data.augment", "losses"]  # once each, while loading
    assert isinstance(cfg.losses, LossConfig) and cfg.losses.weights == {"clip": 1.0, "fd": 2000.0}
    assert isinstance(cfg.data.augment, AugmentPolicy) and cfg.data.augment.scale == (0.3, 1.0)
    assert config_from_dict(BASE).data.augment is None  # the teacher cache's policy
    plain = cfg.to_dict()  # checkpoints and config.json: the mappings as written, JSON-ready
    assert plain["losses"] == losses and plain["data"]["augment"] == {"flip": 0, "scale": [0.3, 1]}
    assert json.loads(json.dumps(plain)) == plain and TrainConfig().to_dict()["losses"] == {"clip": 1.0}
    with pytest.raises(UserError, match="data.augment must be a mapping"):
        config_from_dict(BASE, ["data.augment=strong"])


@pytest.mark.parametrize(
    "groups, match",
    [
        ({"studnt": {"lr": 1.0}}, "unknown optimiser group 'studnt' in optim.groups; did you mean 'student'"),
        ({"cluster_classifier": {"lr": 1e-6}}, "this run's groups: student, student_no_decay, distiller$"),
        ({"l0_masks": {"lr": 0.1}}, "unknown optimiser group 'l0_masks'"),  # only with student.sparsity
        ({"distiller": {"lr": -1}}, "negative"),
        ({"distiller": {"lr": "fast"}}, "not a finite number"),
        ({"distiller": {"momentum": 0.9}}, "no setting 'momentum'"),
        ({"distiller": 0.1}, "must be a mapping"),
        ([1], "optim.groups must be a mapping"),
    ],
)
def test_optimiser_groups_are_checked_at_load(groups, match):
    with pytest.raises(UserError, match=match) as err:
        config_from_dict({**BASE, "optim": {"groups": groups}})
    assert "\n" not in str(err.value)


def test_optimiser_groups_of_the_recipe_terms_kept_as_written():
    cfg = config_from_dict(
        {**BASE, "losses": {"clip": 1.0, "cluster": {"centres": "c.npy"}}},
        ["optim.groups.cluster_classifier.lr=1e-6", "optim.groups.student.weight_decay=0"],
    )
    assert cfg.optim.groups == {"cluster_classifier": {"lr": "1e-6"}, "student": {"weight_decay": 0}}


def test_old_losses_groups_move_to_optim_groups_with_a_warning(caplog):
    old = {"clip": 1.0, "fd": 1.0, "groups": {"distiller": {"lr": 0.5, "weight_decay": 0.01}}}
    with caplog.at_level("WARNING"):
        cfg = config_from_dict({**BASE, "losses": old, "optim": {"groups": {"distiller": {"lr": 0.2}}}})
    assert "losses.groups is deprecated" in caplog.text and "optim.groups" in caplog.text
    assert cfg.optim.groups == {"distiller": {"lr": 0.2, "weight_decay": 0.01}}  # optim.groups wins
    assert cfg.to_dict()["losses"] == {"clip": 1.0, "fd": 1.0}
    with pytest.raises(UserError, match="unknown optimiser group 'distillr'"):
        config_from_dict({**BASE, "losses": {"clip": 1.0, "groups": {"distillr": {"lr": 0.1}}}})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'lr'"),
        (["stepz=3"], "did you mean 'steps'"),
        (["data.batch_size=abc"], "data.batch_size = 'abc' must be a number"),
        (["data.batch_size=2.5"], "whole number"),
        (["precision=fp8"], "precision"),
        (["deterministic=maybe"], "true or false"),
        (["epochs=2"], "not both"),
        (["losses.crdd=1"], "did you mean 'crd'"),
        (["teacher.mode=online"], "needs teacher.spec"),
        (["data.augment.flipp=0"], "did you mean 'flip'"),
        (["optim"], "key=value"),
        (["student.text=teacher"], None),
    ],
)
def test_errors_name_the_key_and_the_fix(overrides, match):
    if match is None:
        assert config_from_dict(BASE, overrides).student.text == "teacher"
        return
    with pytest.raises(UserError, match=match):
        config_from_dict(BASE, overrides)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_configs([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_configs([bad])
    with pytest.raises(UserError, match="steps or epochs"):
        config_from_dict({})


def test_apply_overrides_creates_nested_keys():
    assert apply_overrides({"a": 1}, ["b.c.d=x", "a=2"]) == {"a": 2, "b": {"c": {"d": "x"}}}


def test_a_checkpoint_recorded_with_losses_groups_still_resumes():
    from clipdistill.train.checkpoint import check_resumable
    from clipdistill.train.config import move_loss_groups

    groups = {"distiller": {"lr": 0.5}}
    new = config_from_dict(
        {**BASE, "losses": {"clip": 1.0, "fd": 1.0}, "optim": {"groups": groups}}
    ).to_dict()
    old = config_from_dict({**BASE, "losses": {"clip": 1.0, "fd": 1.0}}).to_dict()
    old["losses"]["groups"] = groups  # how older releases recorded the same run
    recorded = move_loss_groups(old, warn=False)  # what restore_run compares
    check_resumable(recorded, new)
    assert recorded["optim"] == new["optim"]  # no "changed optimiser settings" either
    with pytest.raises(UserError, match="--resume: losses was"):
        check_resumable(recorded, config_from_dict({**BASE, "losses": {"clip": 1.0}}).to_dict())
