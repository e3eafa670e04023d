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
    cfg = config_from_dict(
        base_config(caption_root, tmp_path / "run", **{"teacher.cache": str(tmp_path / "cache")})
    )
    summary = train(cfg)
    assert summary["teacher_mode"] == "cached" and summary["steps"] == 6


def _first_step(cfg_dict: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    from clipdistill.train.distributed import DistInfo
    from clipdistill.train.engine import Run

    run = Run(config_from_dict(cfg_dict), DistInfo())
    logs = run.train_step([next(iter(run.loader))])
    named = {f"student.{n}": p for n, p in run.student.named_parameters()}
    named.update({f"distiller.{n}": p for n, p in run.distiller.named_parameters()})
    return logs, {n: p.grad.clone() for n, p in named.items() if p.grad is not None}


def test_cached_and_online_teacher_agree_on_first_step(tiny, caption_root, tmp_path):
    shards, _ = resolve_shards("caps:train", caption_root)
    build_cache(create_model("fake:24"), shards, tmp_path / "cache", augmentations=3)
    common = {
        "teacher.cache": str(tmp_path / "cache"),
        "optim.grad_clip": None,
        "losses": {"clip": 1.0, "crd": 1.0, "fd": 10.0, "icl": 1.0, "kd": 1.0},
    }
    cached_logs, cached = _first_step(
        base_config(caption_root, tmp_path / "a", **common, **{"teacher.mode": "cached"})
    )
    online_logs, online = _first_step(
        base_config(caption_root, tmp_path / "b", **common, **{"teacher.mode": "online"})
    )
    assert cached_logs.keys() == online_logs.keys()
    for key in cached_logs:
        assert cached_logs[key] == pytest.approx(online_logs[key], rel=1e-5, abs=1e-6), key
    assert cached.keys() == online.keys() and any(k.startswith("distiller.") for k in cached)
    for name, g in cached.items():
        torch.testing.assert_close(online[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def test_mismatched_cache_is_refused(tiny, caption_root, make_dataset, tmp_path):
    shards, _ = resolve_shards("caps:train", caption_root)
    build_cache(create_model("fake:24/1"), shards, tmp_path / "cache", augmentations=2)
    with pytest.raises(UserError, match="different weights"):
        train(
            config_from_dict(
                base_config(caption_root, tmp_path / "a", **{"teacher.cache": str(tmp_path / "cache")})
            )
        )
    other = make_dataset("other", kind="retrieval", n=8, split="train")
    with pytest.raises(UserError, match="no entry for data shard 'other/train/0.tar'"):
        train(
            config_from_dict(
                base_config(
                    other,
                    tmp_path / "b",
                    **{
                        "teacher.cache": str(tmp_path / "cache"),
                        "teacher.spec": None,
                        "data.train": ["other:train"],
                    },
                )
            )
        )
    with pytest.raises(UserError, match="augmentation policy"):
        train(
            config_from_dict(
                base_config(
                    caption_root,
                    tmp_path / "c",
                    **{
                        "teacher.cache": str(tmp_path / "cache"),
                        "teacher.spec": None,
                        "data.augment": {"flip": 0.0},
                    },
                )
            )
        )


def test_corrupt_sample_is_skipped_and_counted(tiny, make_dataset, tmp_path):
    root = make_dataset("bad", kind="retrieval", n=12, split="train", corrupt=(3,), no_caption=(7,))
    summary = train(
        config_from_dict(
            base_config(
                root, tmp_path / "run", **{"data.train": ["bad:train"], "steps": 3, "data.batch_size": 4}
            )
        )
    )
    # 12 samples, 2 bad: 12 consumed samples pass each bad one once or twice
    assert summary["skipped"]["undecodable image"] >= 1 and summary["skipped"]["no caption"] >= 1
    assert summary["steps"] == 3


def test_non_finite_loss_stops_with_term_and_step(tiny, caption_root, tmp_path, monkeypatch):
    from clipdistill.losses.clip_kd import FeatureDistill
    from clipdistill.train.engine import NonFiniteLoss

    calls = {"n": 0}
    original = FeatureDistill.forward

    def poisoned(self, student, teacher):
        out = original(self, student, teacher)
        calls["n"] += 1
        if calls["n"] == 3:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(FeatureDistill, "forward", poisoned)
    cfg = config_from_dict(base_config(caption_root, tmp_path / "run"))
    with pytest.raises(NonFiniteLoss, match=r"step 3 \(term 'fd'"):
        train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())


def test_resume_refuses_a_changed_recipe(tiny, caption_root, tmp_path):
    train(config_from_dict(base_config(caption_root, tmp_path / "run", steps=2)))
    with pytest.raises(UserError, match="--resume: losses"):
        train(
            config_from_dict(base_config(caption_root, tmp_path / "run", steps=4, losses={"clip": 1.0})),
            resume=True,
        )
    assert (
        train(config_from_dict(base_config(caption_root, tmp_path / "run", steps=4)), resume=True)["steps"]
        == 4
    )


def test_periodic_evaluation_is_logged(tiny, caption_root, tmp_path):
    cfg = config_from_dict(
        base_config(caption_root, tmp_path / "run", **{"eval.datasets": ["caps:train"], "eval.every": 3})
    )
    summary = train(cfg)
    metrics = summary["eval"]["caps:train"]
    assert set(metrics) >= {"text_retrieval_recall@1", "image_retrieval_recall@10"}
    assert all(0 <= v <= 1 for v in metrics.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {
        "loss/loss",
        "loss/crd",
        "lr/student",
        "speed/images_per_s",
        "eval/caps:train/text_retrieval_recall@1",
    } <= set(tags)
    assert [e.step for e in events.Scalars("eval/caps:train/text_retrieval_recall@1")] == [3, 6]
