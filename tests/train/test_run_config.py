"""Run config: YAML + dotted overrides into typed dataclasses; every mistake is a one-line UserError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clipdistill.errors import UserError
from clipdistill.train.config import apply_overrides, config_from_dict, load_configs

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
    assert cfg.loss_config().weights == {"clip": 1.0}
    assert config_from_dict({"optim": {"lr": "1e-3"}, "steps": 1}).optim.lr == 1e-3  # YAML's 1e-3 is a string
    assert config_from_dict({"steps": 1}).teacher_mode == "none"


def test_merging_a_run_config_with_a_loss_recipe(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({**BASE, "losses": {"clip": 1.0, "kd": 1.0}, "optim": {"lr": 2e-3}}))
    cfg = load_configs([run, CONFIGS / "clip_kd.yaml"], ["optim.weight_decay=0.2"])
    assert set(cfg.loss_config().weights) == {"clip", "crd", "icl", "fd"}  # the recipe replaces losses whole
    assert cfg.optim.lr == 2e-3 and cfg.optim.weight_decay == 0.2
    assert cfg.to_dict()["losses"]["fd"] == 2000.0


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
