"""Training a student's suffix on stored frozen-prefix activations (`clipdistill.train.prefix`)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FakeTeacher

from clipdistill.data.shards import dataset_info, iter_samples
from clipdistill.errors import UserError
from clipdistill.models.freeze import split_image_tower
from clipdistill.models.students import create_student
from clipdistill.train.prefix import (
    Activations,
    SuffixTrainConfig,
    collect,
    embed,
    fit_head,
    join_views,
    random_crop,
    train_suffix,
)


@pytest.fixture(scope="module")
def _lite0():
    torch.manual_seed(0)
    return create_student("efficientnet-lite0", embed_dim=24, image_size=32).eval()


@pytest.fixture
def lite0(_lite0):
    """A fresh copy for each test (the tests train it in place); building it once is the slow part."""
    return copy.deepcopy(_lite0)


def test_collect_then_embed_equals_the_whole_tower(lite0, make_dataset):
    root = make_dataset("caps", kind="retrieval", n=6, split="train")
    prefix, suffix = split_image_tower(lite0, 5)
    teacher = FakeTeacher(24)
    samples = list(iter_samples(dataset_info("caps", root).shards("train")))
    acts = collect({"k": (prefix.eval(), lite0)}, teacher, samples, captions=True, flip=True, batch_size=4)[
        "k"
    ]
    assert acts.prefix.shape[:2] == (2, 6) and acts.teacher_image.shape == (2, 6, 24)
    assert acts.text.shape == (12, 24) and acts.text_owner.tolist() == [i // 2 for i in range(12)]
    x = torch.stack([lite0.preprocess(s.image.convert("RGB")) for s in samples])
    with torch.no_grad():
        whole = F.normalize(lite0.image_features(x).embedding, dim=-1)
    torch.testing.assert_close(embed(suffix, acts.prefix[0]), whole, atol=2e-2, rtol=0)  # fp16 storage
    with pytest.raises(UserError, match="no samples"):
        collect({"k": (prefix, lite0)}, teacher, [], captions=False)


def test_crop_views_are_reproducible_and_targets_match_their_crop(lite0, make_dataset):
    root = make_dataset("caps", kind="retrieval", n=5, split="train")
    prefix, _ = split_image_tower(lite0, 5)
    teacher = FakeTeacher(24)
    samples = list(iter_samples(dataset_info("caps", root).shards("train")))
    run = dict(captions=True, flip=False, centre=False, crops=2, crop_scale=(0.3, 0.6), batch_size=2)
    a = collect({"k": (prefix.eval(), lite0)}, teacher, samples, **run)["k"]
    b = collect({"k": (prefix.eval(), lite0)}, teacher, samples, **run)["k"]
    assert a.prefix.shape[:2] == (2, 5)
    torch.testing.assert_close(a.prefix, b.prefix, atol=0, rtol=0)  # drawn from the keys: same crops
    crop = random_crop(samples[3].image.convert("RGB"), samples[3].key, 1, (0.3, 0.6))
    w, h = samples[3].image.size
    assert 0.3 * w * h * 0.9 <= crop.size[0] * crop.size[1] <= 0.6 * w * h * 1.1
    with torch.no_grad():
        target = teacher.image_features(teacher.preprocess(crop)[None]).embedding[0]
    torch.testing.assert_close(a.teacher_image[1, 3], target.float())
    assert not torch.equal(a.teacher_image[0], a.teacher_image[1])  # two different crops
    centre = collect({"k": (prefix.eval(), lite0)}, teacher, samples, captions=True, flip=True, batch_size=2)
    joined = join_views(centre["k"], a)
    assert joined.prefix.shape[:2] == (4, 5) and torch.equal(joined.teacher_image[2:], a.teacher_image)
    with pytest.raises(UserError, match="different images"):
        join_views(centre["k"], Activations(a.prefix[:, :2], a.teacher_image[:, :2], keys=a.keys[:2]))
    with pytest.raises(UserError, match="no views"):
        collect({"k": (prefix, lite0)}, teacher, samples, captions=False, centre=False)


# The suffix of the synthetic-activation tests: Lite0's last block and head (at 32 px its input is 192 x 1 x 1),
# 4x cheaper to train than from block 5 on, with the same parts (MBConv, conv head, batch norm, linear head).
SPLIT, PREFIX_SHAPE = 6, (192, 1, 1)


def _synthetic(suffix, n: int, views: int = 1, seed: int = 0) -> Activations:
    """Random prefix activations whose teacher targets are an exact linear map of the pooled features."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randn(views, n, *PREFIX_SHAPE, generator=gen).half()
    head, suffix.head = suffix.head, torch.nn.Identity()
    with torch.no_grad():
        pooled = torch.stack([suffix.eval()(v.float()) for v in prefix])
    suffix.head = head
    w = torch.randn(pooled.shape[-1], 24, generator=gen)
    text = torch.randn(n, 24, generator=gen)
    return Activations(prefix, pooled @ w + 0.5, text, torch.arange(n))


def test_ridge_head_recovers_a_linear_target(lite0):
    _, suffix = split_image_tower(lite0, SPLIT)
    acts = _synthetic(suffix, 300)
    cos = fit_head(suffix, [acts], ridge=1e-8)
    assert cos > 0.999
    torch.testing.assert_close(
        embed(suffix, acts.prefix[0]), F.normalize(acts.teacher_image[0], dim=-1), atol=1e-3, rtol=0
    )


def test_training_lowers_the_loss_and_keeps_batchnorm_statistics(lite0):
    _, suffix = split_image_tower(lite0, SPLIT)
    paired, unpaired = _synthetic(suffix, 1500), _synthetic(suffix, 300, seed=1)  # more rows than features
    noise = torch.randn(paired.teacher_image.shape, generator=torch.Generator().manual_seed(5))
    paired.teacher_image = paired.teacher_image + paired.teacher_image.std() * noise  # not linear any more
    stats = suffix.bn2.running_mean.clone()
    # The head starts at the ridge solution (the best linear fit); the trunk block's training beats it. A
    # small head lr leaves the head there: AdamW's first steps at 1e-3 would undo the fit.
    cfg = SuffixTrainConfig(
        losses={"fd": 2000.0},
        epochs=4,
        batch_size=375,
        unpaired_batch_size=75,
        warmup_steps=2,
        lr=1e-5,
        trunk_lr=1e-4,
    )
    log = train_suffix(suffix, paired, unpaired, cfg, teacher_scale=50.0)
    assert log["steps"] == 16 and log["ridge_head_cosine"] < 0.999
    assert torch.equal(suffix.bn2.running_mean, stats)
    cos = F.cosine_similarity(embed(suffix, paired.prefix[0]), paired.teacher_image[0]).mean()
    assert cos > log["ridge_head_cosine"]
    no_caps = Activations(paired.prefix, paired.teacher_image)
    with pytest.raises(UserError, match="no captions"):
        train_suffix(suffix, no_caps, None, cfg, teacher_scale=50.0)
