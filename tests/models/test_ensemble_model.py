"""The ensemble teacher as one model (models/ensemble.py, docs/methods.md section 7.1): `ensemble:` specs,
and embeddings that are the members' normalised ones concatenated, each member at its own preprocessing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipdistill.errors import UserError
from clipdistill.eval.runner import split_spec
from clipdistill.models.base import ImageConfig
from clipdistill.models.ensemble import EnsembleModel, member_model
from clipdistill.models.factory import create_model, ensemble_members, ensemble_spec, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from tiny_models import FakeTeacher, register  # noqa: E402

CAPTIONS = ["a dog on the grass", "two cats", "a red car in the rain"]


@pytest.fixture(scope="module", autouse=True)
def _fake_prefix():
    register()  # `fake:DIM[/SEED]` builds a FakeTeacher


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 26, 3), dtype=np.uint8)) for i in range(n)]


def two_members() -> list[FakeTeacher]:
    """Members of different widths and preprocessing (20 px at 0.5/0.5; 24 px from 28 at CLIP's mean/std)."""
    first, second = FakeTeacher(24, seed=0), FakeTeacher(16, seed=1)
    second.image_config = ImageConfig(size=24, resize=28)
    return [first, second]


def test_spec_splits_only_before_a_known_prefix():
    assert ensemble_members("fake:24+fake:16/1") == ["fake:24", "fake:16/1"]
    assert ensemble_members("teacher:/runs/a+b+openclip:ViT-B-32/tag") == [
        "teacher:/runs/a+b",
        "openclip:ViT-B-32/tag",
    ]
    spec = ensemble_spec(["teacher:/runs/a+b", "fake:16"])
    assert spec == "ensemble:teacher:/runs/a+b+fake:16" and str(parse_spec(spec)) == spec
    assert ensemble_spec(["fake:24"]) == "fake:24"  # a list of one is that spec
    assert split_spec("ensemble:fake:24+fake:16") == ("ensemble", "fake:24+fake:16")
    for bad in ("", "fake:24+ensemble:fake:16+fake:8", "24+fake:16"):
        with pytest.raises(UserError, match="ensemble spec|has no prefix"):
            ensemble_members(bad)
    with pytest.raises(UserError, match="names no teacher"):
        ensemble_spec([])


def test_create_model_builds_the_members_in_order():
    model = create_model("ensemble:fake:24+fake:16/1")
    assert isinstance(model, EnsembleModel) and model.spec == "ensemble:fake:24+fake:16/1"
    assert [m.spec for m in model.members] == ["fake:24", "fake:16/1"]
    assert model.embed_dim == 40 and model.widths == [24, 16]
    assert member_model(model, 1) is model.members[1]
    with pytest.raises(UserError, match="teacher.member = 2"):
        member_model(model, 2)


def test_embeddings_are_the_members_normalised_embeddings_concatenated():
    members = two_members()
    model = EnsembleModel(members).eval()
    pics = images()
    with torch.no_grad():
        got = model.encode_image(torch.stack([model.preprocess(im) for im in pics]))
        own = [
            m.encode_image(torch.stack([m.preprocess(im) for im in pics]), normalize=True) for m in members
        ]
        text = model.encode_text(model.tokenize(CAPTIONS))
        own_text = [m.encode_text(m.tokenize(CAPTIONS), normalize=True) for m in members]
        unit = model.encode_image(torch.stack([model.preprocess(im) for im in pics]), normalize=True)
    assert got.shape == (3, 40) and text.shape == (3, 40)
    torch.testing.assert_close(got, torch.cat(own, dim=1))
    torch.testing.assert_close(text, torch.cat(own_text, dim=1))
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(unit, F.normalize(torch.cat(own, dim=1), dim=1))
    # the ensemble's cosine is the mean of the members' cosines
    cos = F.normalize(got, dim=1) @ F.normalize(text, dim=1).T
    torch.testing.assert_close(cos, sum(a @ b.T for a, b in zip(own, own_text)) / 2)
    with pytest.raises(ValueError, match="preprocess images differently"):
        model.image_features(torch.zeros(2, 3, 20, 20))


def test_members_sharing_preprocessing_take_one_image_batch():
    model = EnsembleModel([FakeTeacher(24, seed=0), FakeTeacher(8, seed=2)]).eval()
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        expect = torch.cat([m.encode_image(x, normalize=True) for m in model.members], dim=1)
        torch.testing.assert_close(model.encode_image(x), expect)


def test_tokens_and_identity():
    members = two_members()
    model = EnsembleModel(members)
    ids = model.tokenize(CAPTIONS)
    for part, member in zip(model.member_tokens(ids[1:]), members):  # row slices keep the layout
        assert torch.equal(part, member.tokenize(CAPTIONS)[1:])
    scales = [m.logit_scale().item() for m in members]
    assert model.logit_scale().item() == pytest.approx(sum(scales) / 2)
    assert model.fingerprint() == EnsembleModel(two_members()).fingerprint()
    assert model.fingerprint() != EnsembleModel(two_members()[::-1]).fingerprint()
