"""The distillation data filter (issue 9): `classes=base` keeps base-class images only, over whole shards;
keep-lists keep listed keys; impossible filters are refused before training."""

from __future__ import annotations

import pytest
from tiny_models import base_config

from clipdistill.data.filter import data_filter
from clipdistill.data.loader import StreamConfig, count_samples, make_loader, resolve_shards
from clipdistill.data.shards import dataset_info
from clipdistill.errors import UserError
from clipdistill.eval.base2novel import split_classes
from clipdistill.models.base import ImageConfig
from clipdistill.train.config import DataConfig, config_from_dict
from clipdistill.train.engine import train

CLASSES = [f"c{i}" for i in range(10)]
VIEWS = {"student": ImageConfig(size=8, resize=8)}


@pytest.fixture
def cls_root(make_dataset):
    # 60 images, labels i % 10, over 3 shards
    return make_dataset("toy10", kind="classification", n=60, classes=CLASSES, split="train", shards=3)


def _labels_by_key(root) -> dict[str, int]:
    info = dataset_info("toy10", root)
    from clipdistill.data.shards import iter_samples

    return {s.key: s.label for s in iter_samples(info.shards("train"))}


def test_classes_base_never_yields_a_novel_image_over_whole_shards(cls_root):
    labels, keys = data_filter(DataConfig(train=["toy10:train"], root=str(cls_root), filter="classes=base"))
    base, novel = split_classes(10)
    assert labels == frozenset(base) and keys is None
    shards = resolve_shards("toy10:train", cls_root)[0]
    truth = _labels_by_key(cls_root)
    assert count_samples(shards, labels) == sum(1 for v in truth.values() if v in base) == 30
    cfg = StreamConfig(shards=shards, batch_size=6, views=VIEWS, text=False, shuffle_buffer=7, labels=labels)
    seen = []
    it = iter(make_loader(cfg))
    for _ in range(10):  # two full epochs of the 30 kept images
        seen += next(it)["keys"]
    assert all(truth[k] in base for k in seen)
    assert set(seen) == {k for k, v in truth.items() if v in base}  # and every base image is reached


def test_seeded_split_and_named_classes(cls_root):
    labels, _ = data_filter(
        DataConfig(train=["toy10:train"], root=str(cls_root), filter="classes=novel", split_seed=3)
    )
    assert labels == frozenset(split_classes(10, 3)[1])
    labels, _ = data_filter(DataConfig(train=["toy10:train"], root=str(cls_root), filter="classes=c1,4"))
    assert labels == frozenset({1, 4})


def test_caption_records_pass_the_class_filter(cls_root, make_dataset):
    root = make_dataset("caps", kind="retrieval", n=5, split="train")  # same data root
    shards = resolve_shards("caps:train", root)[0] + resolve_shards("toy10:train", root)[0]
    labels, _ = data_filter(
        DataConfig(train=["caps:train", "toy10:train"], root=str(root), filter="classes=base")
    )
    assert count_samples(shards, labels) == 5 + 30


def test_keep_list(cls_root, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("s0000001\ns0000004\n\n")
    _, keys = data_filter(DataConfig(train=["toy10:train"], root=str(cls_root), keep=str(keep)))
    assert keys == frozenset({"s0000001", "s0000004"})
    assert count_samples(resolve_shards("toy10:train", cls_root)[0], None, keys) == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"filter": "classes=base"}, "needs a classification set"),
        ({"filter": "labels=base", "train": ["toy10:train"]}, "unknown data filter"),
        ({"keep": "missing.txt"}, "does not exist"),
    ],
)
def test_impossible_filters_are_refused(cls_root, make_dataset, data, message):
    make_dataset("caps", kind="retrieval", n=5, split="train")
    cfg = DataConfig(**{"train": ["caps:train"], "root": str(cls_root), **data})
    with pytest.raises(UserError, match=message):
        data_filter(cfg)


def test_engine_trains_on_the_filtered_set_only(tiny, cls_root, tmp_path):
    cfg = base_config(
        cls_root,
        tmp_path / "run",
        **{
            "data.train": ["toy10:train"],
            "data.filter": "classes=base",
            "steps": 2,
            "data.batch_size": 4,
            "losses": {"ifalign": 1.0},
        },
    )
    summary = train(config_from_dict(cfg))
    assert summary["steps"] == 2
