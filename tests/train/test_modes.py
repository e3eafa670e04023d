"""Engine modes: an image-only student on the teacher's frozen text tower (cached and online), the masked
view for MFD, bf16 autocast, and the `clipdistill distill` command."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny_models import base_config

from clipdistill.cli.main import main
from clipdistill.data.loader import resolve_shards
from clipdistill.data.teacher_cache import build_cache
from clipdistill.errors import UserError
from clipdistill.models.factory import create_model
from clipdistill.train.config import config_from_dict
from clipdistill.train.distributed import DistInfo
from clipdistill.train.engine import Run


@pytest.fixture
def cache(tiny, caption_root, tmp_path):
    shards, _ = resolve_shards("caps:train", caption_root)
    build_cache(create_model("fake:24"), shards, tmp_path / "cache", augmentations=2)
    return str(tmp_path / "cache")


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_image_only_student_with_masked_view(caption_root, cache, tmp_path, mode):
    changes = {
        "student": {"spec": "student:vit-t-32", "text": "teacher"},
        "teacher.cache": cache,
        "teacher.mode": mode,
        "losses": {"clip": 1.0, "fd": 10.0, "mfd": {"weight": 10.0, "mask_ratio": 0.5}},
        "steps": 2,
    }
    if mode == "cached":
        changes["teacher.spec"] = None
    run = Run(config_from_dict(base_config(caption_root, tmp_path / mode, **changes)), DistInfo())
    text_before = {
        n: p.clone() for n, p in run.student.image.model.named_parameters() if not n.startswith("visual.")
    }
    image_before = run.student.image.model.visual.conv1.weight.clone()
    batch = next(iter(run.loader))
    out = run.forward_module(batch["views"]["student"], None, 123)
    assert out["image"].shape == (8, 24) and out["image_masked"].shape == (8, 24) and "text" not in out
    assert not torch.allclose(out["image_masked"], out["image"])
    assert torch.equal(
        out["image_masked"], run.forward_module(batch["views"]["student"], None, 123)["image_masked"]
    )
    logs = run.train_step([batch])
    assert {"clip", "fd", "mfd"} <= logs.keys() and all(
        torch.isfinite(torch.tensor(v)) for v in logs.values()
    )
    assert all(
        torch.equal(p, text_before[n])
        for n, p in run.student.image.model.named_parameters()
        if n in text_before
    )
    assert not torch.equal(run.student.image.model.visual.conv1.weight, image_before)


def test_baseline_without_teacher(tiny, caption_root, tmp_path):
    cfg = base_config(
        caption_root, tmp_path / "base", **{"teacher.spec": None, "losses": {"clip": 1.0}, "steps": 2}
    )
    summary = Run(config_from_dict(cfg), DistInfo()).run()
    assert summary["teacher_mode"] == "none" and set(summary["final"]) >= {"clip", "loss"}
    with pytest.raises(UserError, match="needs 'teacher'"):
        Run(
            config_from_dict({**cfg, "losses": {"clip": 1.0, "crd": 1.0}, "output_dir": str(tmp_path / "x")}),
            DistInfo(),
        )


def test_bf16_autocast_trains(tiny, caption_root, tmp_path):
    run = Run(config_from_dict(base_config(caption_root, tmp_path / "bf16", precision="bf16")), DistInfo())
    summary = run.run()
    assert summary["steps"] == 6 and all(torch.isfinite(torch.tensor(v)) for v in summary["final"].values())


def test_distill_command(tiny, caption_root, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(base_config(caption_root, tmp_path / "run")))
    assert main(["distill", "--config", str(cfg), "steps=2", "optim.accum_steps=2"]) == 0
    assert "distilled 2 steps" in capsys.readouterr().out
    assert main(["distill", "--config", str(cfg), "steps=2"]) == 2  # the run exists: --resume or a new dir
    assert main(["distill", "--config", str(cfg), "steps=3", "--resume"]) == 2  # accum_steps differs
    assert main(["distill", "--config", str(cfg), "steps=3", "optim.accum_steps=2", "--resume"]) == 0
    assert main(["distill", "--config", str(cfg), "optim.lr=-1", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "optim.lr = -1" in capsys.readouterr().err
