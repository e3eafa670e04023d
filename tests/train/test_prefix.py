"""Training a student's suffix on stored frozen-prefix activations (`clipdistill.train.prefix`)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FakeTeacher

from clipdistill.data.shards import dataset_info, iter_samples
from clipdistill.errors import UserError
from clipdistill.losses.distiller import Distiller
from clipdistill.models.freeze import split_image_tower
from clipdistill.models.students import create_student
from clipdistill.train.prefix import (
    Activations,
    SuffixStudent,
    SuffixTrainConfig,
    caption_targets,
    collect,
    embed,
    fit_head,
    join_views,
    random_crop,
    suffix_param_groups,
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


def test_caption_head_fits_the_captions_and_never_reads_the_teacher_image(lite0):
    _, suffix = split_image_tower(lite0, SPLIT)
    acts = _synthetic(suffix, 300)
    target = F.normalize(acts.teacher_image[0].double(), dim=-1)  # what the captions average to
    gen = torch.Generator().manual_seed(3)
    # two captions per image, on either side of the target (their normalised mean is the target's direction)
    side = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    side -= (side * target).sum(-1, keepdim=True) * target
    caps = torch.stack([target + 0.3 * side, target - 0.3 * side], 1).reshape(600, 24)
    acts.text, acts.text_owner = (caps * 7.0).float(), torch.arange(300).repeat_interleave(2)
    expect = torch.stack(
        [F.normalize(F.normalize(caps[2 * i : 2 * i + 2], dim=-1).sum(0), dim=0) for i in range(300)]
    )
    torch.testing.assert_close(caption_targets(acts).double(), expect, atol=1e-6, rtol=0)
    acts.teacher_image = torch.full_like(acts.teacher_image, float("nan"))  # must not be read
    no_caps = Activations(acts.prefix, acts.teacher_image)  # caption-less sets are skipped
    assert fit_head(suffix, [acts, no_caps], ridge=1e-8, target="caption") > 0.999
    torch.testing.assert_close(embed(suffix, acts.prefix[0]).double(), expect, atol=1e-3, rtol=0)
    with pytest.raises(UserError, match="needs a set with captions"):
        fit_head(suffix, [no_caps], target="caption")
    with pytest.raises(UserError, match="choose one of ridge, caption, random"):
        SuffixTrainConfig(head_init="teacher")


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


# A short run for the tests below: 120 paired rows in batches of 40 (3 steps an epoch), unpaired batches of 20.
SHORT = dict(epochs=3, batch_size=40, unpaired_batch_size=20, warmup_steps=2)


def _short_run(suffix, losses, on_step=None, **cfg):
    paired, unpaired = _synthetic(suffix, 120, views=2), _synthetic(suffix, 60, seed=1)
    cfg = SuffixTrainConfig(losses=losses, **{**SHORT, **cfg})
    return train_suffix(suffix, paired, unpaired, cfg, teacher_scale=50.0, on_step=on_step)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_groups_are_the_old_head_and_trunk_groups(lite0):
    """Without cfg.groups the Distiller's parameters join the head's groups, as before optim.groups existed."""
    _, suffix = split_image_tower(lite0, SPLIT)
    recipe = {"clip": 1.0, "icl": 1.0, "afd": 1.0}  # the Distiller owns scales and fusion layers
    model = SuffixStudent(suffix)
    distiller = Distiller(SuffixTrainConfig(losses=recipe).losses, 24, 24)
    params = [p for p in model.parameters() if p.requires_grad] + list(distiller.parameters())
    # the construction before cfg.groups, verbatim
    cfg = SuffixTrainConfig(losses=recipe, lr=3e-4, trunk_lr=1e-4, weight_decay=0.05)
    head = {id(p) for p in suffix.head.parameters()} | {id(model.logit_scale)}
    head |= {id(p) for p in distiller.parameters()}
    old = []
    for lr, members in (
        (cfg.lr, [p for p in params if id(p) in head]),
        (cfg.trunk_lr, [p for p in params if id(p) not in head]),
    ):
        old += [
            (lr, cfg.weight_decay, [id(p) for p in members if p.ndim >= 2]),
            (lr, 0.0, [id(p) for p in members if p.ndim < 2]),
        ]
    old = [g for g in old if g[2]]
    for groups in (None, {}):
        cfg.groups = groups
        new = suffix_param_groups(model, distiller, params, cfg)
        assert [(g["base_lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in new] == old
    assert any(len(g[2]) for g in old[:2]) and len({lr for lr, _, _ in old}) == 2


def test_group_overrides_apply_to_the_distillers_groups_and_follow_the_schedule(lite0, monkeypatch):
    made = []

    class Spy(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    _, suffix = split_image_tower(lite0, SPLIT)
    groups = {"distiller": {"lr": 1e-6, "weight_decay": 0.01}}
    log = _short_run(suffix, {"clip": 1.0, "afd": 1.0}, groups=groups, lr=3e-4, trunk_lr=1e-4)
    by_name = {g["name"]: g for g in made[0].param_groups}
    assert set(by_name) == {
        "head",
        "head_no_decay",
        "trunk",
        "trunk_no_decay",
        "distiller",
        "distiller_no_decay",
    }
    assert by_name["distiller"]["base_lr"] == by_name["distiller_no_decay"]["base_lr"] == 1e-6
    assert (
        by_name["distiller"]["weight_decay"] == 0.01 and by_name["distiller_no_decay"]["weight_decay"] == 0.0
    )
    assert by_name["head"]["base_lr"] == 3e-4 and by_name["trunk"]["base_lr"] == 1e-4
    assert by_name["head"]["weight_decay"] == 0.05
    # the warmup/cosine factor of the last step (9 steps, 2 of warmup) scales every group alike
    factor = 0.5 * (1 + math.cos(math.pi * 6 / 7))
    assert log["steps"] == 9
    for g in made[0].param_groups:
        assert g["lr"] == pytest.approx(g["base_lr"] * factor, rel=1e-12)
    with pytest.raises(UserError, match="did you mean 'distiller'"):
        SuffixTrainConfig(losses={"clip": 1.0, "afd": 1.0}, groups={"distiler": {"lr": 1e-6}})
    with pytest.raises(UserError, match="no setting 'momentum'"):
        SuffixTrainConfig(losses={"clip": 1.0}, groups={"distiller": {"momentum": 0.9}})


@pytest.mark.parametrize(
    ("losses", "term"),
    [({"clip": 1.0, "mfd": 2000.0}, "mfd"), ({"dclip": 1.0}, "dclip")],
)
def test_recipes_the_stored_activations_cannot_serve_are_refused_before_training(lite0, losses, term):
    _, suffix = split_image_tower(lite0, SPLIT)
    before = _state(suffix)
    with pytest.raises(UserError, match=f"term '{term}' needs") as err:
        _short_run(suffix, losses)
    assert "\n" not in str(err.value)
    assert _same(_state(suffix), before)  # refused before the head's fit and any step


def test_the_unpaired_forward_runs_only_when_a_term_reads_it(lite0, monkeypatch):
    """Skipping it changes nothing: same paired batches, same weights."""
    cfg = SuffixTrainConfig(losses={"clip": 1.0, "kd": 1.0})
    assert not Distiller(cfg.losses, 24, 24).uses_unpaired
    assert Distiller(SuffixTrainConfig(losses={"fd": 2000.0}).losses, 24, 24).uses_unpaired
    own = {"weight": 1.0, "own_projector": True, "bank_size": 64}
    assert Distiller(SuffixTrainConfig(losses={"relational": own}).losses, 24, 24).uses_unpaired

    def run(losses, **cfg):
        _, suffix = split_image_tower(copy.deepcopy(lite0), SPLIT)
        sizes = []
        suffix.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        _short_run(suffix, losses, **cfg)
        return _state(suffix), 20 in sizes  # 20: an unpaired batch (paired: 40)

    skipped, forward = run(cfg.losses.weights)
    assert not forward
    _, forward = run({"fd": 2000.0})
    assert forward
    _, forward = run(cfg.losses.weights, frozen_bn=False)  # batch norm in train mode: its statistics move
    assert forward
    monkeypatch.setattr(Distiller, "uses_unpaired", property(lambda self: True))
    kept, forward = run(cfg.losses.weights)
    assert forward and _same(kept, skipped)


def test_on_step_runs_every_curve_every_steps_and_after_the_last(lite0):
    steps = []
    _, suffix = split_image_tower(copy.deepcopy(lite0), SPLIT)
    _, plain = split_image_tower(copy.deepcopy(lite0), SPLIT)
    suffix.head.drop.p = plain.head.drop.p = 0.2  # training draws from the global generator

    def record(step, module):
        steps.append(step)
        assert module is suffix
        embed(module, torch.zeros(2, *PREFIX_SHAPE))  # switches every module to train mode and back
        torch.rand(3)  # draws from the global generator too

    log = _short_run(suffix, {"clip": 1.0, "fd": 2000.0}, on_step=record, curve_every=4)
    assert log["steps"] == 9 and steps == [0, 4, 8, 9]
    _short_run(plain, {"clip": 1.0, "fd": 2000.0})
    assert _same(_state(suffix), _state(plain))  # the hook changed nothing (frozen batch norms included)
    steps.clear()
    _, suffix = split_image_tower(copy.deepcopy(lite0), SPLIT)
    _short_run(suffix, {"clip": 1.0}, on_step=lambda step, m: steps.append(step), epochs=1)
    assert steps == [3]  # curve_every 0: the last step only
    with pytest.raises(UserError, match="curve_every"):
        SuffixTrainConfig(curve_every=-1)


def test_subset_keeps_captions_with_their_images(lite0):
    _, suffix = split_image_tower(lite0, SPLIT)
    acts = _synthetic(suffix, 6, views=2)
    counts = torch.tensor([2, 1, 3, 1, 2, 1])
    acts.text = torch.randn(int(counts.sum()), 24, generator=torch.Generator().manual_seed(3))
    acts.text_owner = torch.repeat_interleave(torch.arange(6), counts)
    acts.keys, acts.labels = [f"img{i}" for i in range(6)], torch.arange(6) * 10
    captions = {acts.keys[o]: acts.text[acts.text_owner == o] for o in range(6)}
    for rows, picked in (([4, 1, 5], [4, 1, 5]), (acts.labels >= 30, [3, 4, 5])):
        sub = acts.subset(rows)
        assert len(sub) == 3 and sub.keys == [f"img{i}" for i in picked]
        assert torch.equal(sub.prefix, acts.prefix[:, picked])
        assert torch.equal(sub.teacher_image, acts.teacher_image[:, picked])
        assert sub.labels.tolist() == [10 * i for i in picked]
        assert sub.text_owner.tolist() == sorted(sub.text_owner.tolist())  # image by image
        for j, key in enumerate(sub.keys):
            assert torch.equal(sub.text[sub.text_owner == j], captions[key])
    plain = Activations(acts.prefix, acts.teacher_image).subset([0, 2])
    assert plain.text is None and plain.keys == [] and plain.labels is None
    with pytest.raises(UserError, match="repeat"):
        acts.subset([1, 1])
