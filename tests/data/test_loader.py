"""The training stream: rank/worker split, determinism, exact resume from a data position, captions,
cached views, skipped samples."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from clipdistill.data.loader import (
    DataState,
    StreamConfig,
    make_loader,
    resolve_shards,
    shard_name,
)
from clipdistill.data.teacher_cache import build_cache
from clipdistill.errors import UserError
from clipdistill.models.base import ImageConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from tiny_models import FakeTeacher  # noqa: E402

VIEWS = {"student": ImageConfig(size=8, resize=8)}


def _cfg(shards, **kw) -> StreamConfig:
    return StreamConfig(
        shards=shards,
        batch_size=kw.pop("batch_size", 4),
        views=kw.pop("views", VIEWS),
        shuffle_buffer=5,
        **kw,
    )


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture
def shards(make_dataset):
    root = make_dataset("caps", kind="retrieval", n=20, shards=2, split="train")
    return resolve_shards("caps:train", root)[0]


def test_resolve_shards(make_dataset, tmp_path):
    root = make_dataset("caps", kind="retrieval", n=4, shards=2, split="train")
    paths, kind = resolve_shards("caps:train", root)
    assert [p.name for p in paths] == ["0.tar", "1.tar"] and kind == "retrieval"
    assert resolve_shards(str(root / "caps" / "train" / "*.tar"))[0] == paths
    assert resolve_shards(f"{root / 'caps'}:train")[0] == paths
    assert shard_name(paths[1]) == "caps/train/1.tar"
    with pytest.raises(UserError, match="no shard matches"):
        resolve_shards(str(tmp_path / "none" / "*.tar"))
    with pytest.raises(UserError, match="no split 'dev'"):
        resolve_shards("caps:dev", root)


def test_ranks_and_workers_split_every_epoch_without_overlap(shards):
    keys = []
    for rank in range(2):
        for batch in _take(make_loader(_cfg(shards, rank=rank, world=2, workers=2, batch_size=1)), 10):
            assert batch["pos"][0] == 0
            keys += batch["keys"]
    assert sorted(keys) == [f"s{i:07d}" for i in range(20)]


def test_stream_is_deterministic_and_reshuffles_each_epoch(shards):
    a = [b["keys"] for b in _take(make_loader(_cfg(shards)), 10)]
    b = [b["keys"] for b in _take(make_loader(_cfg(shards)), 10)]
    c = [b["keys"] for b in _take(make_loader(_cfg(shards, seed=1)), 10)]
    assert a == b and a != c
    assert sorted(sum(a[:5], [])) == sorted(sum(a[5:], [])) and a[:5] != a[5:]  # two epochs, new order


def test_one_random_caption_per_sample(shards):
    batches = _take(make_loader(_cfg(shards)), 10)
    caps = {}
    for b in batches:
        for key, cap in zip(b["keys"], b["captions"]):
            assert cap in (f"caption {int(key[1:])} one", f"caption {int(key[1:])} two")
            caps.setdefault(key, set()).add(cap)
    assert any(len(v) == 2 for v in caps.values())  # epochs draw captions independently


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_data_position_is_exact(shards, workers):
    cfg = _cfg(shards, workers=workers, batch_size=3)
    full = _take(make_loader(cfg), 12)
    state = DataState(streams=max(1, workers))
    for b in full[:7]:
        state.update(b)
    resumed = _take(make_loader(cfg, state=DataState.from_state(state.state_dict())), 5)
    for a, b in zip(full[7:], resumed):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["views"]["student"], b["views"]["student"])


def test_corrupt_samples_are_skipped_and_counted(make_dataset):
    root = make_dataset("bad", kind="retrieval", n=10, split="train", corrupt=(2,), no_caption=(5,))
    shards = resolve_shards("bad:train", root)[0]
    state = DataState()
    for b in _take(make_loader(_cfg(shards, batch_size=4)), 4):  # 16 of 8 good samples: two epochs
        assert "s0000002" not in b["keys"] and "s0000005" not in b["keys"]
        state.update(b)
    assert state.skipped.reasons == {"undecodable image": 2, "no caption": 2}
    unlabeled = _take(make_loader(_cfg(shards, batch_size=4, text=False)), 1)[0]
    assert unlabeled["captions"] is None


def test_cached_views_and_embeddings(shards, tmp_path):
    teacher = FakeTeacher()
    cache = build_cache(teacher, shards, tmp_path / "c", augmentations=3)
    views = {"student": ImageConfig(size=8, resize=8), "teacher": teacher.image_config}
    batch = _take(make_loader(_cfg(shards, views=views), cache), 1)[0]
    for i, key in enumerate(batch["keys"]):
        shard, row = cache.lookup(shard_name(shards[0]), key) or cache.lookup(shard_name(shards[1]), key)
        j = [k for k in range(3) if torch.equal(torch.from_numpy(shard.aug[row, k].copy()), batch["aug"][i])]
        assert j and torch.equal(batch["teacher_image"][i], torch.from_numpy(shard.image[row, j[0]].copy()))
        with torch.no_grad():
            online = teacher.image_features(batch["views"]["teacher"][i : i + 1]).embedding[0]
        torch.testing.assert_close(online, batch["teacher_image"][i], rtol=1e-5, atol=1e-6)
        text = teacher.text_features(teacher.tokenize([batch["captions"][i]])).embedding[0]
        torch.testing.assert_close(text, batch["teacher_text"][i], rtol=1e-5, atol=1e-6)
