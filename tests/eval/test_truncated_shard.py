"""Issue 23, defect 6 (second half): a truncated shard is counted in lost samples, not read-error
events, by `eval` and `cache-teacher`: from the shard index when there is one ("7 of its 16 samples
lost"), else "shard N unreadable after sample K"."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
from fake_clip import class_index, lookup_model, one_hot
from helpers.cli import run_eval

from clipdistill.cli.main import main
from clipdistill.data.teacher_cache import TeacherCache
from clipdistill.eval.runner import evaluate
from clipdistill.models import factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from tiny_models import FakeTeacher  # noqa: E402

CLASSES = ("cat", "dog")


def _truncate_inside(shard: Path, member: str) -> None:
    """Cut `shard` in the middle of `member`'s data, as an interrupted copy would."""
    with tarfile.open(shard) as tar:
        info = tar.getmember(member)
    shard.write_bytes(shard.read_bytes()[: info.offset_data + info.size // 2])


@pytest.fixture
def toy(make_dataset, monkeypatch):
    """A 16-sample one-shard `toy` split whose tar is cut inside sample 9 (9 samples readable), and a
    `fake:` model that knows its images."""
    root = make_dataset("toy", n=16, classes=CLASSES)
    model = lookup_model(root, "toy", lambda i, s: one_hot(s.label, 2), class_index(CLASSES), 2)
    monkeypatch.setitem(factory._ADAPTERS, "fake", lambda rest: model)
    _truncate_inside(root / "toy" / "test" / "0.tar", "s0000009.png")
    return root


def _index(root: Path, split: str = "test") -> None:
    (root / "toy" / split / "sizes.json").write_text(json.dumps({"0.tar": 16}))


def test_eval_counts_the_samples_a_truncated_shard_lost(toy, tmp_path, capsys):
    _index(toy)
    rc = run_eval(toy, "--quiet", "--output", str(tmp_path / "rec.json"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "9 samples, 7 skipped" in out, out
    assert "shard toy/test/0.tar unreadable after sample 9: 7 of its 16 samples lost" in out, out
    extra = json.loads((tmp_path / "rec.json").read_text())["clipdistill"]
    assert extra["samples"] == 9 and extra["skipped"] == 7
    assert extra["skipped_reasons"] == {"lost in unreadable shard": 7}


def test_eval_without_an_index_says_where_the_shard_became_unreadable(toy):
    extra = evaluate("fake:x", "toy", data_root=toy, progress=False, cache=False)["clipdistill"]
    assert extra["samples"] == 9
    # sample 9's header was read before the cut: that one loss is known, the rest is not
    assert extra["skipped"] == 1, extra
    assert len(extra["unreadable"]) == 1
    assert extra["unreadable"][0].startswith("shard toy/test/0.tar unreadable after sample 9:"), extra


def test_eval_counts_a_tar_cut_between_members(make_dataset, monkeypatch):
    """Python's tarfile raises nothing when the cut falls in a header: the missing end blocks tell."""
    root = make_dataset("toy", n=16, classes=CLASSES)
    model = lookup_model(root, "toy", lambda i, s: one_hot(s.label, 2), class_index(CLASSES), 2)
    monkeypatch.setitem(factory._ADAPTERS, "fake", lambda rest: model)
    shard = root / "toy" / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmember("s0000009.png").offset + 100
    shard.write_bytes(shard.read_bytes()[:cut])
    _index(root)
    extra = evaluate("fake:x", "toy", data_root=root, progress=False, cache=False)["clipdistill"]
    assert extra["samples"] == 9 and extra["skipped"] == 7, extra


def _cache_teacher(root: Path, out: Path, split: str) -> list[str]:
    return [
        "cache-teacher",
        "--teacher",
        "fake:24",
        "--data",
        f"toy:{split}",
        "--data-root",
        str(root),
        "--out",
        str(out),
        "--augmentations",
        "1",
    ]


@pytest.fixture
def caps(make_dataset, monkeypatch):
    """A 16-sample one-shard image-caption split cut inside sample 9, and a fake teacher."""
    root = make_dataset("toy", kind="retrieval", n=16, split="train")
    _truncate_inside(root / "toy" / "train" / "0.tar", "s0000009.png")
    monkeypatch.setitem(factory._ADAPTERS, "fake", lambda rest: FakeTeacher())
    return root


def test_cache_teacher_counts_the_samples_a_truncated_shard_lost(caps, tmp_path, capsys):
    _index(caps, "train")
    rc = main(_cache_teacher(caps, tmp_path / "c", "train"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "9 samples x " in out and "skipped 7" in out, out
    assert "shard toy/train/0.tar unreadable after sample 9: 7 of its 16 samples lost" in out, out
    entry = TeacherCache(tmp_path / "c").info.shards[0]
    assert entry["samples"] == 9 and entry["skipped"] == {"lost in unreadable shard": 7}


def test_cache_teacher_without_an_index_says_where_the_shard_became_unreadable(caps, tmp_path, capsys):
    rc = main(_cache_teacher(caps, tmp_path / "c", "train"))
    out = capsys.readouterr().out
    assert rc == 0 and "9 samples x " in out and "skipped 1" in out, out
    assert "shard toy/train/0.tar unreadable after sample 9:" in out, out
