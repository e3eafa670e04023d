"""Checkpoints (atomic, RNG round trip, readable errors), the lr schedule and the optimiser groups."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from clipdistill.errors import UserError
from clipdistill.losses.config import parse_loss_config
from clipdistill.losses.distiller import Distiller
from clipdistill.train.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clipdistill.train.config import OptimConfig
from clipdistill.train.optim import check_groups, group_names, lr_factor, param_groups


def test_save_is_atomic_and_round_trips_rng(tmp_path):
    state = {"step": 3, "w": torch.arange(4.0), "rng": rng_state()}
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path, state)
    assert has_checkpoint(tmp_path) and not [
        p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name
    ]
    loaded = load_checkpoint(tmp_path)
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"])
    assert (tmp_path / "checkpoints" / "last.json").read_text().startswith('{"step": 3')


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)


def test_warmup_then_cosine():
    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5) and f[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(50, 10, 0, "constant", 0.0) == 1.0


def test_param_groups_split_decay_and_apply_overrides():
    student = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    distiller = Distiller(parse_loss_config({"clip": 1.0, "fd": 1.0}), 4, 6)
    overrides = {"student_no_decay": {"lr": 1e-4}, "distiller": {"lr": 0.5}}
    groups = param_groups(student, distiller, OptimConfig(lr=1e-3, weight_decay=0.1, groups=overrides))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"student", "student_no_decay", "distiller"}
    assert len(by_name["student"]["params"]) == 1 and by_name["student_no_decay"]["weight_decay"] == 0.0
    assert by_name["student_no_decay"]["lr"] == 1e-4 and by_name["distiller"]["lr"] == 0.5
    assert by_name["student"]["lr"] == 1e-3 and by_name["distiller"]["weight_decay"] == 0.1
    # unknown names are refused when the config is loaded (tests/train/test_run_config.py)
    known = group_names(parse_loss_config({"clip": 1.0, "fd": 1.0}), masked=False)
    with pytest.raises(UserError, match="did you mean 'student'"):
        check_groups({"studnt": {"lr": 1.0}}, known)
