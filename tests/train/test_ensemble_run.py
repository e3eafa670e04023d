"""An ensemble teacher through the engine (docs/methods.md section 7.1): `teacher.spec` as a list, online
and cached runs that agree, the chosen member for every term but ensemble_kd, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.cli import one_line_error
from tiny_models import base_config

from clipdistill.cli.main import main
from clipdistill.data.loader import resolve_shards
from clipdistill.data.teacher_cache import build_cache
from clipdistill.errors import UserError
from clipdistill.models.factory import create_model
from clipdistill.train.config import config_from_dict
from clipdistill.train.distributed import DistInfo
from clipdistill.train.engine import Run, train

MEMBERS = ["fake:24", "fake:16/1"]
ENSEMBLE = "ensemble:fake:24+fake:16/1"
LOSSES = {"clip": 1.0, "ensemble_kd": 1.0, "fd": 10.0, "crd": 1.0}


def ensemble_config(root, out, **changes) -> dict:
    return base_config(root, out, **{"teacher.spec": MEMBERS, "losses": LOSSES, **changes})


def build_ensemble_cache(root, folder, spec=ENSEMBLE) -> str:
    shards, _ = resolve_shards("caps:train", root)
    build_cache(create_model(spec), shards, folder, augmentations=2)
    return str(folder)


def first_step(cfg: dict) -> tuple[Run, dict, dict[str, torch.Tensor]]:
    run = Run(config_from_dict(cfg), DistInfo())
    batch = next(iter(run.loader))
    logs = run.train_step([batch])
    named = {f"student.{n}": p for n, p in run.student.named_parameters()}
    named.update({f"distiller.{n}": p for n, p in run.distiller.named_parameters()})
    return run, logs, {n: p.grad.clone() for n, p in named.items() if p.grad is not None}


def test_ensemble_teacher_distils_end_to_end(tiny, caption_root, tmp_path):
    summary = train(config_from_dict(ensemble_config(caption_root, tmp_path / "run", steps=2)))
    assert summary["steps"] == 2 and summary["teacher_mode"] == "online"
    for key in ("loss", "ensemble_kd", "ensemble_kd/i2t", "fd", "crd"):
        assert torch.isfinite(torch.tensor(summary["final"][key])), key


def test_cached_and_online_ensemble_agree_on_first_step(tiny, caption_root, tmp_path):
    cache = build_ensemble_cache(caption_root, tmp_path / "cache")
    common = {"teacher.cache": cache, "optim.grad_clip": None}
    _, cached_logs, cached = first_step(
        ensemble_config(caption_root, tmp_path / "a", **common, **{"teacher.mode": "cached"})
    )
    _, online_logs, online = first_step(
        ensemble_config(caption_root, tmp_path / "b", **common, **{"teacher.mode": "online"})
    )
    assert cached_logs.keys() == online_logs.keys() and "ensemble_kd" in cached_logs
    for key in cached_logs:
        assert cached_logs[key] == pytest.approx(online_logs[key], rel=1e-5, abs=1e-6), key
    assert cached.keys() == online.keys()
    for name, g in cached.items():
        torch.testing.assert_close(online[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_other_terms_see_the_chosen_member(tiny, caption_root, tmp_path, mode):
    """teacher.member = 1: the teacher's own fields are member 1's (normalised) outputs, exactly what the
    single teacher fake:16/1 gives on the same batch; the members ride along for ensemble_kd."""
    changes = {"teacher.member": 1}
    if mode == "cached":
        changes["teacher.cache"] = build_ensemble_cache(caption_root, tmp_path / "cache")
    run = Run(config_from_dict(ensemble_config(caption_root, tmp_path / "a", **changes)), DistInfo())
    assert run.distiller.teacher_dim == 16
    batch = next(iter(run.loader))
    got = run.teacher_side.outputs([batch])
    assert [m.image.shape[1] for m in got.members] == [24, 16]
    single = create_model(MEMBERS[1]).eval()
    with torch.no_grad():
        text = F.normalize(single.text_features(single.tokenize(batch["captions"])).embedding, dim=-1)
        if mode == "online":  # member 1's view: the same crop at member 1's preprocessing
            image = F.normalize(single.image_features(batch["views"]["teacher/1"]).embedding, dim=-1)
            torch.testing.assert_close(got.image, image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.text, text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.image, got.members[1].image)
    assert got.scale.item() == pytest.approx(single.logit_scale().item())


def test_config_takes_a_member_list(tiny, caption_root, tmp_path):
    cfg = config_from_dict(base_config(caption_root, tmp_path / "r"), ["teacher.spec=[fake:24, fake:16/1]"])
    assert cfg.teacher.spec == MEMBERS and cfg.teacher.model_spec == ENSEMBLE
    one = config_from_dict(base_config(caption_root, tmp_path / "r", **{"teacher.spec": ["fake:24"]}))
    assert one.teacher.model_spec == "fake:24"  # a list of one is that teacher
    with pytest.raises(UserError, match=r"teacher.member = 2 but teacher.spec names an ensemble of 2"):
        config_from_dict(ensemble_config(caption_root, tmp_path / "r", **{"teacher.member": 2}))
    with pytest.raises(UserError, match=r"teacher.member = 1 but teacher.spec names a single teacher"):
        config_from_dict(base_config(caption_root, tmp_path / "r", **{"teacher.member": 1}))
    with pytest.raises(UserError, match="student.text = teacher borrows one teacher's"):
        config_from_dict(ensemble_config(caption_root, tmp_path / "r", **{"student.text": "teacher"}))
    with pytest.raises(UserError, match=r"teacher.spec = \[\] names no teacher"):
        config_from_dict(base_config(caption_root, tmp_path / "r", **{"teacher.spec": []}))


def test_a_cache_of_another_teacher_structure_is_refused(tiny, caption_root, tmp_path, capsys):
    ensemble_cache = build_ensemble_cache(caption_root, tmp_path / "ens")
    single_cache = build_ensemble_cache(caption_root, tmp_path / "one", spec=MEMBERS[0])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(base_config(caption_root, tmp_path / "run", **{"teacher.cache": ensemble_cache}))
    )
    capsys.readouterr()  # the cache builds' progress bars
    rc = main(["distill", "--config", str(cfg), "steps=1"])
    one_line_error(capsys, rc, "holds an ensemble of 2 teachers", "single model 'fake:24'", "teacher.spec")
    rc = main(
        [
            "distill",
            "--config",
            str(cfg),
            "steps=1",
            f"teacher.cache={single_cache}",
            "teacher.spec=[fake:24, fake:16/1]",
        ]
    )
    one_line_error(capsys, rc, "holds the single teacher 'fake:24'", "ensemble of 2", "cache-teacher")
    rc = main(["distill", "--config", str(cfg), "steps=1", "teacher.spec=[fake:16/1, fake:24]"])
    one_line_error(capsys, rc, "other members, weights, preprocessing or order")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step
    # without teacher.spec the cache names the teacher; teacher.member is checked against its members
    rc = main(["distill", "--config", str(cfg), "steps=1", "teacher.spec=null", "teacher.member=2"])
    one_line_error(capsys, rc, "teacher.member = 2", "holds 2 member(s)")


def test_a_checkpoint_from_before_teacher_member_resumes(tiny, caption_root, tmp_path):
    """Checkpoints written before teacher.member existed record no such key; they resume (member 0)."""
    cfg = base_config(caption_root, tmp_path / "run", steps=1, losses={"clip": 1.0, "kd": 1.0})
    train(config_from_dict(cfg))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    del state["config"]["teacher"]["member"]
    torch.save(state, last)
    assert train(config_from_dict({**cfg, "steps": 2}), resume=True)["steps"] == 2
    with pytest.raises(UserError, match="--resume: teacher was"):
        train(
            config_from_dict(
                {**cfg, "steps": 3, "teacher": {**cfg["teacher"], "member": 0, "mode": "online"}}
            ),
            resume=True,
        )


def test_plain_kd_with_an_ensemble_warns_that_it_distils_one_member(tiny, caption_root, tmp_path, caplog):
    cfg = ensemble_config(
        caption_root, tmp_path / "a", losses={"clip": 1.0, "kd": 1.0}, **{"teacher.member": 1}
    )
    with caplog.at_level("WARNING", logger="clipdistill.train.engine"):
        Run(config_from_dict(cfg), DistInfo())
    assert "term 'kd' distils member 1 of the ensemble teacher only; use 'ensemble_kd'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipdistill.train.engine"):
        Run(config_from_dict(ensemble_config(caption_root, tmp_path / "b")), DistInfo())
    assert "ensemble_kd" not in caplog.text
