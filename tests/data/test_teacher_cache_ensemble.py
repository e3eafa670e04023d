"""The teacher cache of an ensemble teacher (docs/methods.md section 7.1): each member's normalised
embeddings of the same views at its own preprocessing, each member's scale, one fingerprint over the
members in order (format 2), and the refusals of a cache built for another teacher structure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdistill.data.augment import replay_many
from clipdistill.data.loader import decode_record, read_raw, resolve_shards
from clipdistill.data.shards import SkipCounter
from clipdistill.data.teacher_cache import TeacherCache, build_cache, teacher_parts
from clipdistill.errors import UserError
from clipdistill.models.base import ImageConfig
from clipdistill.models.ensemble import EnsembleModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from tiny_models import FakeTeacher  # noqa: E402


@pytest.fixture
def shards(make_dataset):
    root = make_dataset("caps", kind="retrieval", n=6, shards=2, split="train")
    return resolve_shards("caps:train", root)[0]


def members(order=(0, 1)) -> list[FakeTeacher]:
    """A 24-wide teacher at 20 px and a 16-wide one at 24 px with CLIP's mean/std (other preprocessing)."""
    first, second = FakeTeacher(24, seed=0), FakeTeacher(16, seed=1)
    second.image_config = ImageConfig(size=24, resize=28)
    second._scale.data.fill_(np.log(20.0))
    both = [first, second]
    return [both[i] for i in order]


def test_cache_holds_each_members_normalised_embeddings(shards, tmp_path):
    teacher = EnsembleModel(members())
    cache = build_cache(teacher, shards, tmp_path / "c", augmentations=2, pooled=True, batch_size=5)
    info = cache.info
    raw = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert raw["format"] == 2 and info.embed_dim == 40 and info.pooled_dim == 16
    assert [(m["embed_dim"], m["pooled_dim"]) for m in info.members] == [(24, 8), (16, 8)]
    assert [m["logit_scale"] for m in info.members] == pytest.approx([50.0, 20.0])
    assert info.member_columns() == [(0, 24), (24, 40)]
    assert info.parts["members"] == [teacher_parts(m) for m in teacher.members]
    sample = next(
        s for s in (decode_record(r, SkipCounter()) for r in read_raw(shards[1:], SkipCounter())) if s
    )
    shard, row = cache.lookup("caps/train/1.tar", sample.key)
    image, text, pooled = [], [], []
    with torch.no_grad():
        for m in teacher.members:  # the same stored views, replayed at each member's own preprocessing
            f = m.image_features(replay_many(sample.image, np.asarray(shard.aug[row]), m.image_config))
            image.append(F.normalize(f.embedding, dim=-1))
            pooled.append(f.pooled)
            text.append(F.normalize(m.text_features(m.tokenize(sample.captions)).embedding, dim=-1))
    np.testing.assert_allclose(shard.image[row], torch.cat(image, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shard.pooled[row], torch.cat(pooled, 1).numpy(), rtol=1e-5, atol=1e-6)
    stored_text = np.stack([shard.text_row(row, c) for c in range(2)])
    np.testing.assert_allclose(stored_text, torch.cat(text, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_single_teacher_cache_is_unchanged_format_1(shards, tmp_path):
    build_cache(FakeTeacher(), shards, tmp_path / "c", augmentations=1)
    raw = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert raw["format"] == 1 and "members" not in raw
    assert TeacherCache(tmp_path / "c").info.members is None


def test_fingerprint_covers_every_member_in_order(shards, tmp_path):
    a = build_cache(EnsembleModel(members()), shards, tmp_path / "a", augmentations=1)
    b = build_cache(EnsembleModel(members((1, 0))), shards, tmp_path / "b", augmentations=1)
    assert a.info.fingerprint != b.info.fingerprint
    assert (
        a.info.fingerprint
        == build_cache(EnsembleModel(members()), shards, tmp_path / "a", augmentations=1).info.fingerprint
    )


def test_a_cache_is_refused_for_another_teacher_structure(shards, tmp_path):
    ensemble = build_cache(EnsembleModel(members()), shards, tmp_path / "e", augmentations=1)
    single = build_cache(members()[0], shards, tmp_path / "s", augmentations=1)
    ensemble.check(shards=shards, teacher=teacher_parts(EnsembleModel(members())))
    with pytest.raises(
        UserError, match=r"holds an ensemble of 2 teachers .* the run's teacher is the single model"
    ) as err:
        ensemble.check(shards=shards, teacher=teacher_parts(members()[0]))
    assert "set teacher.spec to the list" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="holds the single teacher .* the run's teacher is an ensemble of 2"):
        single.check(shards=shards, teacher=teacher_parts(EnsembleModel(members())))
    with pytest.raises(UserError, match="other members, weights, preprocessing or order"):
        ensemble.check(shards=shards, teacher=teacher_parts(EnsembleModel(members((1, 0)))))
    with pytest.raises(UserError, match="other members"):
        ensemble.check(shards=shards, teacher=teacher_parts(EnsembleModel([FakeTeacher(24, seed=0)])))


def test_cache_teacher_cli_takes_one_teacher_per_member(shards, tmp_path, capsys, monkeypatch):
    from clipdistill.cli.main import main
    from clipdistill.models import factory

    monkeypatch.setitem(factory._ADAPTERS, "fake", lambda rest: members()[int(rest)])
    data = str(shards[0].parent.parent) + ":train"
    args = [
        "cache-teacher",
        "--teacher",
        "fake:0",
        "--teacher",
        "fake:1",
        "--data",
        data,
        "--augmentations",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    assert "embedding width 40 (24 + 16, normalised)" in capsys.readouterr().out
    info = TeacherCache(tmp_path / "c").info
    assert [m["teacher"] for m in info.members] == ["fake:0", "fake:1"]
    assert info.parts["teacher"] == "ensemble:fake:0+fake:1"
    assert main([*args, "--out", str(tmp_path / "d"), "--dclip"]) == 2
    assert "pass a single --teacher" in capsys.readouterr().err
