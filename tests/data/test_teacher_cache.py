"""Teacher cache: stored views and embeddings match the teacher, nothing is computed twice, a cache built
for another teacher, policy or data is refused, writes are atomic, corrupt samples are skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.data.augment import AugmentPolicy, replay_many
from clipdistill.data.loader import decode_record, read_raw, resolve_shards
from clipdistill.data.shards import SkipCounter
from clipdistill.data.teacher_cache import TeacherCache, build_cache, teacher_parts
from clipdistill.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from tiny_models import FakeTeacher  # noqa: E402


@pytest.fixture
def shards(make_dataset):
    root = make_dataset("caps", kind="retrieval", n=10, shards=2, split="train", corrupt=(4,))
    return resolve_shards("caps:train", root)[0]


def test_cache_holds_the_teachers_embeddings_of_each_view_and_caption(shards, tmp_path):
    teacher = FakeTeacher()
    cache = build_cache(teacher, shards, tmp_path / "c", augmentations=3, pooled=True, batch_size=7)
    info = cache.info
    assert info.samples == 9 and info.augmentations == 3 and info.embed_dim == 24 and info.pooled_dim == 8
    assert info.shards[0]["skipped"] == {"undecodable image": 1}
    assert teacher.images_seen == 27
    assert info.logit_scale == pytest.approx(50.0)
    sample = next(
        s for s in (decode_record(r, SkipCounter()) for r in read_raw(shards[1:], SkipCounter())) if s
    )
    shard, row = cache.lookup("caps/train/1.tar", sample.key)
    views = replay_many(sample.image, np.asarray(shard.aug[row]), teacher.image_config)
    with torch.no_grad():
        f = teacher.image_features(views)
        t = teacher.text_features(teacher.tokenize(sample.captions)).embedding
    np.testing.assert_allclose(shard.image[row], f.embedding.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shard.pooled[row], f.pooled.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.stack([shard.text_row(row, c) for c in range(2)]), t.numpy(), rtol=1e-5, atol=1e-6
    )
    assert cache.lookup("caps/train/0.tar", "s0000004") is None  # the corrupt sample
    assert not list(tmp_path.glob("c/shards/.*")) and not list(tmp_path.glob("c/.*"))


def test_rebuild_reuses_and_never_recomputes(shards, tmp_path):
    teacher = FakeTeacher()
    build_cache(teacher, shards, tmp_path / "c", augmentations=2)
    seen = teacher.images_seen
    build_cache(teacher, shards, tmp_path / "c", augmentations=2)
    assert teacher.images_seen == seen
    # An interrupted build (no cache.json, one shard missing) recomputes only the missing shard.
    (tmp_path / "c" / "cache.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "c" / "shards" / "00001")
    build_cache(teacher, shards, tmp_path / "c", augmentations=2)
    assert teacher.images_seen == seen + 2 * 5
    with pytest.raises(UserError, match="--overwrite"):
        build_cache(teacher, shards, tmp_path / "c", augmentations=3)
    build_cache(teacher, shards, tmp_path / "c", augmentations=3, overwrite=True)
    assert TeacherCache(tmp_path / "c").info.augmentations == 3


def test_check_refuses_a_cache_built_for_something_else(shards, tmp_path):
    cache = build_cache(FakeTeacher(), shards, tmp_path / "c", augmentations=2, dtype="float16")
    assert cache.lookup("caps/train/0.tar", "s0000000")[0].image.dtype == np.float16
    cache.check(shards=shards, teacher=teacher_parts(FakeTeacher()), policy=AugmentPolicy(), text=True)
    with pytest.raises(UserError, match="different weights"):
        cache.check(teacher=teacher_parts(FakeTeacher(seed=3)))
    with pytest.raises(UserError, match="augmentation policy"):
        cache.check(policy=AugmentPolicy(scale=(0.2, 1.0)))
    with pytest.raises(UserError, match="no pooled features"):
        cache.check(pooled=True)
    with open(shards[0], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(UserError, match="bytes"):
        cache.check(shards=shards)
    with pytest.raises(UserError, match="not a finished teacher cache"):
        TeacherCache(tmp_path / "nothing")
    (tmp_path / "c" / "cache.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(UserError, match="cannot read teacher cache"):
        TeacherCache(tmp_path / "c")


class _CachingTeacher(FakeTeacher):
    """Records whether its (pretend) feature cache was active when it embedded each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_cache = object()
        self.calls: list[tuple[int, bool]] = []

    def image_features(self, images, *, tokens=False):
        self.calls.append((images.shape[0], self.feature_cache is not None))
        return super().image_features(images, tokens=tokens)


def test_centre_views_use_the_teachers_feature_cache_random_views_bypass_it(shards, tmp_path):
    teacher = _CachingTeacher()
    build_cache(
        teacher,
        shards[:1],
        tmp_path / "c",
        augmentations=3,
        policy=AugmentPolicy(center_view=True),
        batch_size=100,
    )
    assert teacher.calls == [(4, True), (8, False)]
    assert teacher.feature_cache is not None


def test_cache_teacher_cli(shards, tmp_path, capsys, monkeypatch):
    from clipdistill.cli.main import main
    from clipdistill.models import factory

    monkeypatch.setitem(factory._ADAPTERS, "fake", lambda rest: FakeTeacher())
    data = str(shards[0].parent.parent) + ":train"
    rc = main(
        [
            "cache-teacher",
            "--teacher",
            "fake:24",
            "--data",
            data,
            "--augmentations",
            "2",
            "--out",
            str(tmp_path / "c"),
            "--augment",
            "flip=0.0",
        ]
    )
    assert rc == 0 and "9 samples x 2 views" in capsys.readouterr().out
    assert TeacherCache(tmp_path / "c").info.policy.flip == 0.0
    assert (
        main(["cache-teacher", "--teacher", "fake:24", "--data", "nope:train", "--out", str(tmp_path / "d")])
        == 2
    )
