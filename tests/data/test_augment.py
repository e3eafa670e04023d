"""Recorded augmentations: deterministic sampling, exact replay at any resolution, the centre view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.data.augment import (
    AUG_FIELDS,
    AugmentPolicy,
    center_params,
    identity_params,
    replay,
    replay_pil,
    sample_params,
    stable_seed,
)
from clipdistill.errors import UserError
from clipdistill.models.base import ImageConfig


def _image(w: int = 60, h: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_sampling_is_deterministic_and_inside_the_image():
    policy = AugmentPolicy()
    a = sample_params(policy, 60, 40, 50, np.random.default_rng(stable_seed(0, "shard", "key")))
    b = sample_params(policy, 60, 40, 50, np.random.default_rng(stable_seed(0, "shard", "key")))
    c = sample_params(policy, 60, 40, 50, np.random.default_rng(stable_seed(1, "shard", "key")))
    assert a.shape == (50, len(AUG_FIELDS)) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    top, left, h, w = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 60).all()
    area = h * w / (60 * 40)
    assert (area >= 0.5 - 0.05).all() and (area <= 1.0 + 1e-6).all()
    assert 0.2 < a[:, 4].mean() < 0.8  # flips about half the time
    assert (a[:, 9] == 0).all()


def test_no_jitter_policy_gives_identity_factors():
    p = sample_params(AugmentPolicy(jitter=0.0, flip=0.0), 30, 30, 20, np.random.default_rng(0))
    assert (p[:, 4] == 0).all() and (p[:, 5:8] == 1).all() and (p[:, 8] == 0).all()


def test_replay_crops_the_recorded_box_and_flips():
    img = _image()
    arr = np.asarray(img)
    params = np.array([5, 7, 20, 30, 0, 1, 1, 1, 0, 0], np.float32)
    out = replay_pil(img, params, 20)  # not square on purpose: resized to 20 x 20
    ref = img.crop((7, 5, 37, 25)).resize((20, 20), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    same_size = replay_pil(img, np.array([5, 7, 20, 20, 1, 1, 1, 1, 0, 0], np.float32), 20)
    assert np.array_equal(np.asarray(same_size), arr[5:25, 7:27][:, ::-1])


def test_replay_follows_each_models_resolution_and_normalisation():
    img = _image()
    params = sample_params(AugmentPolicy(), 60, 40, 1, np.random.default_rng(3))[0]
    small = ImageConfig(size=16, resize=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    large = ImageConfig(size=48, resize=48)
    xs, xl = replay(img, params, small), replay(img, params, large)
    assert xs.shape == (3, 16, 16) and xl.shape == (3, 48, 48)
    # Same view: the large one brought to 16 px and to the small one's normalisation matches closely.
    pil_l = replay_pil(img, params, 48).resize((16, 16), Image.Resampling.BOX)
    pil_s = replay_pil(img, params, 16)
    diff = np.abs(np.asarray(pil_l, float) - np.asarray(pil_s, float)).mean()
    other = replay_pil(img, sample_params(AugmentPolicy(), 60, 40, 1, np.random.default_rng(4))[0], 16)
    assert diff < 0.5 * np.abs(np.asarray(other, float) - np.asarray(pil_s, float)).mean()
    assert torch.allclose(
        xs, (torch.from_numpy(np.asarray(pil_s, np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.5, atol=1e-6
    )


def test_jitter_is_applied_before_resizing_so_colours_agree():
    img = Image.new("RGB", (20, 20), (100, 120, 140))
    params = np.array([0, 0, 20, 20, 0, 1.2, 1, 1, 0, 0], np.float32)
    for size in (8, 20):
        assert np.asarray(replay_pil(img, params, size))[0, 0].tolist() == [120, 144, 168]


def test_center_view_is_the_models_evaluation_transform():
    img = _image()
    cfg = ImageConfig(size=24, resize=28)
    p = sample_params(AugmentPolicy(center_view=True), 60, 40, 3, np.random.default_rng(0))
    assert p[0].tolist() == center_params(60, 40).tolist() and (p[1:, 9] == 0).all()
    assert torch.equal(replay(img, p[0], cfg), cfg.transform()(img))
    assert identity_params(60, 40)[2:4].tolist() == [40, 60]


def test_bad_policy_and_box_are_refused():
    with pytest.raises(UserError, match="scale"):
        AugmentPolicy(scale=(0.0, 1.0))
    with pytest.raises(UserError, match="did you mean 'flip'"):
        AugmentPolicy.from_dict({"flipp": 0.5})
    with pytest.raises(ValueError, match="outside"):
        replay_pil(_image(), np.array([30, 0, 20, 20, 0, 1, 1, 1, 0, 0], np.float32), 8)
    assert AugmentPolicy.from_dict({"scale": [0.3, 1]}).as_dict()["scale"] == [0.3, 1.0]
