"""The training loop end to end on tiny models: online and cached teacher, summary, errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import base_config

from clipdistill.data.loader import resolve_shards
from clipdistill.data.teacher_cache import build_cache
from clipdistill.errors import UserError
from clipdistill.models.factory import create_model
from clipdistill.train.config import config_from_dict
from clipdistill.train.engine import train


def test_online_run_writes_summary_and_checkpoint(tiny, caption_root, tmp_path):
    cfg = config_from_dict(base_config(caption_root, tmp_path / "run"))
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["teacher_mode"] == "online"
    for key in ("loss", "clip", "crd", "fd"):
        assert key in summary["final"] and torch.isfinite(torch.tensor(summary["final"][key]))
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert (out / "checkpoints" / "last.pt").exists() and (out / "student.pt").exists()
    assert list((out / "tensorboard").iterdir())
    with pytest.raises(UserError, match="--resume"):
        train(cfg)


def test_cached_run(tiny, caption_root, tmp_path):
    shards, _ = resolve_shards("caps:train", caption_root)
    teacher = create_model("fake:24")
    build_cache(teacher, shards, tmp_path / "cache", augmentations=2)
    cfg = config_from_dict(base_config(caption_root, tmp_path / "run", **{"teacher.cache": str(tmp_path / "cache")}))
    summary = train(cfg)
    assert summary["teacher_mode"] == "cached" and summary["steps"] == 6
