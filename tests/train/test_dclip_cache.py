"""DCLIP from a teacher cache (spec 6): the meta-teacher head is trained once on the teacher's tokens,
its enriched embeddings are stored per caption beside the cache, and the `dclip` term trains from them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import base_config

from clipdistill.data.loader import resolve_shards, shard_name
from clipdistill.data.shards import iter_samples
from clipdistill.data.teacher_cache import TeacherCache, build_cache
from clipdistill.errors import UserError
from clipdistill.losses.dclip import DclipMetaHead
from clipdistill.models.dclip_teacher import MetaTeacherConfig, _image_tokens, build_dclip_extras
from clipdistill.models.factory import create_model
from clipdistill.train.config import config_from_dict
from clipdistill.train.engine import train


@pytest.fixture
def dclip_cache(tiny, caption_root, tmp_path):
    teacher = create_model("fake:24")
    shards = resolve_shards("caps:train", caption_root)[0]
    build_cache(teacher, shards, tmp_path / "cache", augmentations=1)
    cfg = MetaTeacherConfig(token_grid=2, epochs=2, batch_size=4)
    head = build_dclip_extras(teacher, shards, tmp_path / "cache", cfg)
    return teacher, shards, tmp_path / "cache", head


def test_extras_hold_the_heads_output_for_every_caption(dclip_cache):
    teacher, shards, root, head_file = dclip_cache
    head = DclipMetaHead.load(head_file)
    cache = TeacherCache(root)
    info = json.loads((root / "dclip.json").read_text())
    assert info["cache_fingerprint"] == cache.info.fingerprint and len(info["losses"]) == 2
    sample = next(iter_samples([shards[0]]))
    shard, row = cache.lookup(shard_name(shards[0]), sample.key)
    from clipdistill.data.augment import replay

    view = replay(sample.image, shard.aug[row, 0], teacher.image_config).unsqueeze(0)
    img_tok = _image_tokens(teacher, view, 2).half().float()
    for c, caption in enumerate(sample.captions):
        f = teacher.text_features(teacher.tokenize([caption]), tokens=True)
        txt_tok = torch.nn.functional.pad(f.tokens, (0, 0, 0, 32 - f.tokens.shape[1])).half().float()
        mask = torch.nn.functional.pad(f.mask, (0, 32 - f.mask.shape[1]), value=False)
        with torch.no_grad():
            v, t = head(img_tok, txt_tok, mask)
        j = shard.text_index(row, c)
        np.testing.assert_allclose(shard.extra("dclip_image")[j], v[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(shard.extra("dclip_text")[j], t[0].numpy(), rtol=1e-4, atol=1e-5)


def test_dclip_trains_from_the_cache(dclip_cache, caption_root, tmp_path):
    _, _, root, _ = dclip_cache
    cfg = base_config(
        caption_root, tmp_path / "run", **{"teacher.cache": str(root), "losses": {"clip": 1.0, "dclip": 1.0}}
    )
    summary = train(config_from_dict(cfg))
    for key in ("dclip/image", "dclip/text", "dclip/contrastive"):
        assert np.isfinite(summary["final"][key]), key


def test_cache_without_extras_or_with_views_is_refused(tiny, caption_root, tmp_path):
    teacher = create_model("fake:24")
    shards = resolve_shards("caps:train", caption_root)[0]
    build_cache(teacher, shards, tmp_path / "plain", augmentations=1)
    cfg = base_config(
        caption_root, tmp_path / "run", **{"teacher.cache": str(tmp_path / "plain"), "losses": {"dclip": 1.0}}
    )
    with pytest.raises(UserError, match="--dclip"):
        train(config_from_dict(cfg))
    build_cache(teacher, shards, tmp_path / "views", augmentations=2)
    with pytest.raises(UserError, match="single-view"):
        build_dclip_extras(teacher, shards, tmp_path / "views")
