"""Hugging Face CLIPModel adapter on a tiny model, tokenizer and image processor saved to tmp_path."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.errors import UserError
from clipdistill.models.factory import create_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("hf_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        resample=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    ).save_pretrained(folder)
    return folder, model, tokenizer


def test_encode_shapes_and_equality(saved):
    folder, ref, _ = saved
    model = create_model(f"hf:{folder}")
    assert model.embed_dim == 24
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = model.image_features(x, tokens=True)
        expect = ref.visual_projection(ref.vision_model(pixel_values=x).pooler_output)
    assert f.embedding.shape == (3, 24) and f.pooled.shape == (3, 32) and f.tokens.shape == (3, 16, 32)
    assert torch.allclose(f.embedding, expect, atol=1e-6)
    assert torch.allclose(model.encode_image(x, normalize=True).norm(dim=-1), torch.ones(3), atol=1e-6)


def test_tokens_mask_and_text(saved):
    folder, ref, tokenizer = saved
    model = create_model(f"hf:{folder}")
    ids = model.tokenize(["a cat", "dog"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, :6].tolist() == [0, 3, 6, 2, 41, 1]  # sot a</w> c a t</w> eot
    with torch.no_grad():
        f = model.text_features(ids, tokens=True)
        batch = tokenizer(["a cat", "dog"], padding="max_length", max_length=16, return_tensors="pt")
        out = ref.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        expect = ref.text_projection(out.pooler_output)
    assert f.mask.sum(1).tolist() == [6, 5]
    assert torch.equal(f.mask, batch["attention_mask"].bool())
    assert torch.allclose(f.embedding, expect, atol=1e-6)
    assert f.tokens.shape == (2, 16, 32)
    assert torch.allclose(model.encode_text(ids, normalize=True).norm(dim=-1), torch.ones(2), atol=1e-6)


def test_logit_scale_and_preprocessing(saved):
    folder, _, _ = saved
    model = create_model(f"hf:{folder}")
    assert math.isclose(model.logit_scale().item(), math.exp(2.6592), rel_tol=1e-4)
    cfg = model.image_config
    assert (cfg.size, cfg.resize, cfg.interpolation) == (32, 36, "bilinear")
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.25, 0.25, 0.25)
    img = Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8))
    x = model.preprocess(img)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-6)


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        create_model(f"hf:{tmp_path}")
    with pytest.raises(UserError, match="empty hf spec"):
        create_model("hf:")
