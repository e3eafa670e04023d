"""Mixed batches end to end (issue 6 track B, issue 9 base-to-novel track): image-caption pairs plus
caption-less classification images used unlabeled, class filter on the unpaired stream, cached and
online teacher agreeing, GradCache accumulation exact, and resume after a crash exact."""

from __future__ import annotations

import random

import pytest
import torch
from test_resume import Crash, _assert_clean_after_resume, _same_weights, crash_at
from tiny_models import base_config

from clipdistill.data.loader import resolve_shards
from clipdistill.data.shards import dataset_info, iter_samples
from clipdistill.data.teacher_cache import build_cache
from clipdistill.errors import UserError
from clipdistill.eval.base2novel import split_classes
from clipdistill.models.factory import create_model
from clipdistill.train.config import config_from_dict
from clipdistill.train.distributed import DistInfo
from clipdistill.train.engine import Run, train

CLASSES = [f"c{i}" for i in range(10)]
LOSSES = {"clip": 1.0, "crd": 1.0, "fd": 10.0, "relational": {"bank_size": 16}}


@pytest.fixture
def mixed_root(make_dataset):
    make_dataset("caps", kind="retrieval", n=24, shards=2, split="train")
    return make_dataset("toy10", kind="classification", n=40, classes=CLASSES, split="train", shards=2)


def _cfg(root, out, **changes):
    base = {
        "data.unpaired": ["toy10:train"],
        "data.unpaired_batch_size": 4,
        "data.filter": "classes=base",
        "losses": LOSSES,
        "steps": 6,
    }
    return base_config(root, out, **{**base, **changes})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "glosses.txt"
    path.write_text("\n".join(f"gloss number {i} about thing {i % 7}" for i in range(50)))
    return str(path)


def _first_step(cfg_dict: dict):
    run = Run(config_from_dict(cfg_dict), DistInfo())
    micro_u = [next(iter(run.loader_u))]
    logs = run.train_step([next(iter(run.loader))], micro_u)
    named = {f"student.{n}": p for n, p in run.student.named_parameters()}
    named.update({f"distiller.{n}": p for n, p in run.distiller.named_parameters()})
    return logs, {n: p.grad.clone() for n, p in named.items() if p.grad is not None}, micro_u


def test_unpaired_stream_keeps_base_classes_and_reaches_the_loss(tiny, mixed_root, tmp_path):
    labels = {s.key: s.label for s in iter_samples(dataset_info("toy10", mixed_root).shards("train"))}
    base, _ = split_classes(10)
    run = Run(config_from_dict(_cfg(mixed_root, tmp_path / "probe")), DistInfo())
    it = iter(run.loader_u)
    seen = [k for _ in range(10) for k in next(it)["keys"]]  # two epochs of the 20 base-class images
    assert all(labels[k] in base for k in seen) and len(set(seen)) == 20
    summary = train(config_from_dict(_cfg(mixed_root, tmp_path / "run")))
    assert summary["unpaired_samples"] == 6 * 4
    for key in ("fd/unpaired", "relational/unpaired", "relational/i2t_unpaired", "relational/i2i_unpaired"):
        assert key in summary["final"], key
    assert "clip/unpaired" not in summary["final"] and "crd/unpaired" not in summary["final"]


def test_cached_and_online_agree_on_a_mixed_first_step(tiny, mixed_root, tmp_path):
    teacher = create_model("fake:24")
    build_cache(teacher, resolve_shards("caps:train", mixed_root)[0], tmp_path / "cache", augmentations=2)
    build_cache(
        teacher,
        resolve_shards("toy10:train", mixed_root)[0],
        tmp_path / "cache_u",
        augmentations=2,
        text=False,
    )
    common = {
        "teacher.cache": str(tmp_path / "cache"),
        "teacher.unpaired_cache": str(tmp_path / "cache_u"),
        "optim.grad_clip": None,
    }
    c_logs, cached, c_micro = _first_step(
        _cfg(mixed_root, tmp_path / "a", **common, **{"teacher.mode": "cached"})
    )
    assert "relational/i2t_unpaired" in c_logs
    o_logs, online, o_micro = _first_step(
        _cfg(mixed_root, tmp_path / "b", **common, **{"teacher.mode": "online"})
    )
    assert c_micro[0]["keys"] == o_micro[0]["keys"]
    assert c_logs.keys() == o_logs.keys() and "fd/unpaired" in c_logs
    for key in c_logs:
        assert c_logs[key] == pytest.approx(o_logs[key], rel=1e-5, abs=1e-6), key
    for name, g in cached.items():
        torch.testing.assert_close(online[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def test_accumulation_over_mixed_micro_batches_equals_one_batch(tiny, mixed_root, tmp_path):
    """k = 2 micro-batches of (4 pairs + 2 unpaired) give the gradients of one batch of (8 + 4)."""
    common = {"optim.grad_clip": None, "losses": {"clip": 1.0, "fd": 10.0, "relational": {"bank_size": 0}}}
    one = Run(config_from_dict(_cfg(mixed_root, tmp_path / "one", **common)), DistInfo())
    two = Run(
        config_from_dict(_cfg(mixed_root, tmp_path / "two", **common, **{"optim.accum_steps": 2})), DistInfo()
    )
    b, bu = next(iter(one.loader)), next(iter(one.loader_u))

    def split(x: dict) -> list[dict]:
        half = len(x["keys"]) // 2
        parts = []
        for sl in (slice(0, half), slice(half, None)):
            part = {**x, "views": {k: v[sl] for k, v in x["views"].items()}, "keys": x["keys"][sl]}
            if x.get("captions") is not None:
                part["captions"] = x["captions"][sl]
            parts.append(part)
        return parts

    logs1 = one.train_step([b], [bu])
    logs2 = two.train_step(split(b), split(bu))
    assert logs1["loss"] == pytest.approx(logs2["loss"], rel=1e-5)
    g1 = {n: p.grad for n, p in one.student.named_parameters() if p.grad is not None}
    g2 = {n: p.grad for n, p in two.student.named_parameters() if p.grad is not None}
    assert g1.keys() == g2.keys()
    for name in g1:
        # float32 sums in another order: a few ulps of the largest gradient (a scaling bug is off by 50%+)
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-4 * g1[name].abs().max().item())


def test_cached_mode_without_unpaired_cache_is_refused(tiny, mixed_root, tmp_path):
    with pytest.raises(UserError, match="unpaired_cache"):
        config_from_dict(_cfg(mixed_root, tmp_path / "x", **{"teacher.cache": str(tmp_path / "cache")}))


def test_corpus_texts_reach_the_text_terms(tiny, mixed_root, corpus, tmp_path):
    summary = train(
        config_from_dict(
            _cfg(mixed_root, tmp_path / "run", **{"data.texts": [corpus], "data.text_batch_size": 6})
        )
    )
    for key in (
        "fd/texts",
        "relational/texts",
        "relational/t2i_texts",
        "relational/t2t_texts",
        "fd/unpaired",
    ):
        assert key in summary["final"], key
    assert "clip/texts" not in summary["final"] and "crd/texts" not in summary["final"]


def test_corpus_texts_need_the_students_own_text_tower(tiny, mixed_root, corpus, tmp_path):
    with pytest.raises(UserError, match="student.text = own"):
        config_from_dict(
            _cfg(mixed_root, tmp_path / "x", **{"data.texts": [corpus], "student.text": "teacher"})
        )
    with pytest.raises(UserError, match="neither 'wordnet' nor a text file"):
        train(
            config_from_dict(
                _cfg(mixed_root, tmp_path / "y", **{"data.texts": [str(tmp_path / "missing.txt")]})
            )
        )


@pytest.mark.slow  # 3 s: a mixed run crashed and resumed; CI runs it (-m slow)
def test_crash_and_resume_of_a_mixed_run(tiny, mixed_root, corpus, tmp_path, monkeypatch):
    """A mixed run (paired, unpaired and corpus streams) dies at a random step and resumes exactly. It dies
    in-process: what the mixed streams add is their state in the checkpoint, read back by the resume in
    both cases; a real SIGKILL (torn files, a stale lock) is test_resume.py's."""
    changes = {
        "steps": 12,
        "checkpoint_every": 3,
        "data.workers": 2,
        "data.texts": [corpus],
        "data.text_batch_size": 4,
    }
    train(config_from_dict(_cfg(mixed_root, tmp_path / "ref", **changes)))
    run_cfg = _cfg(mixed_root, tmp_path / "run", **changes)
    with monkeypatch.context() as patch:
        crash_at(patch, random.Random(5).randint(4, 8))
        with pytest.raises(Crash):
            train(config_from_dict(run_cfg))
    killed_at = int(torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["step"])
    assert killed_at in (3, 6) and not (tmp_path / "run" / "summary.json").exists()
    summary = train(config_from_dict(run_cfg), resume=True)
    assert summary["steps"] == 12 and summary["unpaired_samples"] == 12 * 4
    _same_weights(tmp_path / "ref" / "student.pt", tmp_path / "run" / "student.pt")
    _assert_clean_after_resume(tmp_path / "run", tmp_path / "ref")


def test_caches_of_two_teachers_are_refused(tiny, mixed_root, tmp_path):
    build_cache(
        create_model("fake:24"),
        resolve_shards("caps:train", mixed_root)[0],
        tmp_path / "cache",
        augmentations=1,
    )
    build_cache(
        create_model("fake:24/1"),
        resolve_shards("toy10:train", mixed_root)[0],
        tmp_path / "cache_u",
        augmentations=1,
        text=False,
    )
    cfg = _cfg(
        mixed_root,
        tmp_path / "x",
        **{
            "teacher.cache": str(tmp_path / "cache"),
            "teacher.spec": None,
            "teacher.unpaired_cache": str(tmp_path / "cache_u"),
            "student.text": "own",
        },
    )
    with pytest.raises(UserError, match="different teachers"):
        train(config_from_dict(cfg))
