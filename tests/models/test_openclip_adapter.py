"""open_clip adapter: tiny random-init ViT, spec parsing and errors, checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.tiny_openclip import TINY
from PIL import Image

from clipdistill.errors import UserError
from clipdistill.models.factory import create_model
from clipdistill.models.openclip import OpenClipModel, from_config, trim_padding


@pytest.fixture(scope="module")
def tiny() -> OpenClipModel:
    torch.manual_seed(0)
    return from_config(TINY, name="tiny")


def test_image_features_match_open_clip(tiny):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = tiny.image_features(x, tokens=True)
        ref = tiny.model.encode_image(x)
        tiny.model.visual.output_tokens = True
        ref_pooled, ref_tokens = tiny.model.visual(x)
        tiny.model.visual.output_tokens = False
    assert f.embedding.shape == (3, 24) and f.pooled.shape == (3, 64) and f.tokens.shape == (3, 16, 64)
    assert torch.equal(f.embedding, ref)
    assert torch.equal(f.embedding, ref_pooled)
    assert torch.equal(f.tokens, ref_tokens)
    assert tiny.image_features(x).tokens is None
    norms = tiny.encode_image(x, normalize=True).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-6)


def test_text_features_and_tokens(tiny):
    ids = tiny.tokenize(["a cat", "a dog on the grass", ""])
    assert ids.dtype == torch.long and ids.shape == (3, 16)
    assert (ids[:, 0] == 49406).all()  # start-of-text
    with torch.no_grad():
        f = tiny.text_features(ids, tokens=True)
        ref = tiny.model.encode_text(ids)
    assert torch.equal(f.embedding, ref)
    assert f.pooled.shape == (3, 64) and f.tokens.shape == (3, 16, 64)
    assert f.mask.tolist()[0] == [True] * 4 + [False] * 12  # sot, a, cat, eot
    assert f.mask.sum(1).tolist() == [4, 7, 2]
    assert torch.allclose(tiny.encode_text(ids, normalize=True).norm(dim=-1), torch.ones(3), atol=1e-6)


class TextTower(torch.nn.Module):
    def __init__(self, model: OpenClipModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)


def test_trailing_padding_is_dropped_exactly(tiny):
    """Causal attention pooled at the end token: encoding without the padding columns gives open_clip's values
    and gradients (float64, so the comparison is tight), and a batch is cut at its longest text."""
    ids = tiny.tokenize(["a cat", "a dog on the grass"])
    assert trim_padding(ids).shape == (2, 7) and trim_padding(torch.zeros(2, 5, dtype=torch.long)).shape == (
        2,
        1,
    )
    model = from_config(TINY, name="tiny64").double()
    emb = model.encode_text(ids)
    ref = model.model.encode_text(ids)  # open_clip: the full context of 16
    assert torch.allclose(emb, ref, atol=1e-12, rtol=0)
    weight = model.model.token_embedding.weight
    (g,) = torch.autograd.grad(emb.square().sum(), weight)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), weight)
    assert torch.allclose(g, g_ref, atol=1e-12, rtol=0)
    # tracing (ONNX export) keeps the whole context: a graph traced on short texts still encodes long ones
    longer = model.tokenize(["a dog on the grass next to a red ball and a small white cat"])
    with torch.no_grad():
        traced = torch.jit.trace(TextTower(model), ids[:1])
        assert torch.allclose(traced(longer), model.model.encode_text(longer), atol=1e-12, rtol=0)
    no_causal = from_config(
        {**TINY, "text_cfg": {**TINY["text_cfg"], "no_causal_mask": True}}, name="nc"
    ).double()
    # without the causal mask the padding is attended to, so nothing may be dropped
    assert torch.allclose(no_causal.encode_text(ids), no_causal.model.encode_text(ids), atol=1e-12, rtol=0)


def test_logit_scale_and_clamp(tiny):
    assert tiny.raw_logit_scale().shape == ()
    assert math.isclose(tiny.logit_scale().item(), 1 / 0.07, rel_tol=1e-5)
    model = from_config(TINY)
    with torch.no_grad():
        model.model.logit_scale.fill_(10.0)
    assert model.logit_scale().item() == pytest.approx(100.0)


def test_preprocessing_from_model_config(tiny):
    cfg = tiny.image_config
    assert cfg.size == 32 and cfg.interpolation == "bicubic"
    assert cfg.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    x = tiny.preprocess(img)
    assert x.shape == (3, 32, 32)
    assert tiny.embed_dim == 24 and tiny.describe()["image"]["size"] == 32


def test_spec_errors(tmp_path):
    with pytest.raises(UserError, match="did you mean 'ViT-B-32'"):
        create_model("openclip:ViT-B-23")
    with pytest.raises(UserError, match="not found"):
        create_model(f"openclip:clipdistill-vit-t-32@{tmp_path / 'missing.pt'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        create_model(f"openclip:clipdistill-vit-t-32@{bad}")
    with pytest.raises(UserError, match="unknown pretrained tag"):
        create_model("openclip:ViT-B-32/no_such_tag")
    with pytest.raises(UserError, match="no open_clip_config.json"):
        create_model(f"openclip:local-dir:{tmp_path}")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    a = create_model("openclip:clipdistill-vit-t-32")
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in a.model.state_dict().items()}}, path)
    b = create_model(f"openclip:clipdistill-vit-t-32@{path}")
    x = torch.randn(2, 3, 32, 32)
    ids = b.tokenize(["a photo"])
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))
        assert torch.equal(a.encode_text(ids), b.encode_text(ids))
    assert b.spec.endswith("ckpt.pt") and b.context_length == 32


def test_timm_tower_pooled_and_tokens():
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "timm_model_name": "mobilenetv3_small_050", "timm_proj": ""},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = from_config(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.image_features(x, tokens=True)
        assert torch.equal(f.embedding, model.model.encode_image(x))
    assert f.pooled.shape == (2, 1024) and f.tokens.shape == (2, 1, 288)
