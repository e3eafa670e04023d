"""TinyCLIP-style inheritance from the composed teacher: same size reproduces it; fewer layers/blocks run."""

from __future__ import annotations

import pytest
import torch

from clipdistill.errors import UserError
from clipdistill.models.composed import ComposedTeacher
from clipdistill.models.composed_inherit import ComposedStudent, InheritedImage, inherit_text, layer_map


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return ComposedTeacher(feature_cache=False).eval()


def test_layer_map_is_tinyclips_every_kth():
    assert layer_map(6, 3) == [0, 2, 4] and layer_map(6, 2) == [0, 3] and layer_map(6, 6) == list(range(6))
    with pytest.raises(UserError, match="1..6"):
        layer_map(6, 7)


def test_same_size_inheritance_reproduces_the_teacher(teacher):
    captions = ["a dog runs on the grass .", "two children play football in a park"]
    ids = teacher.tokenize(captions)
    x = torch.randn(2, 3, 96, 96)
    student = ComposedStudent(teacher, text_layers=6, image=InheritedImage(teacher, [1, 3, 3, 4, 4, 5, 1])).eval()
    with torch.no_grad():
        assert torch.equal(student.text_features(ids).embedding, teacher.text_features(ids).embedding)
        assert torch.equal(student.image_features(x).embedding, teacher.image_features(x).embedding)
        assert torch.equal(student.tokenize(captions), ids)


def test_fewer_layers_and_blocks_run_and_train(teacher):
    text = inherit_text(teacher, 3)
    assert len(text.bert.encoder.layer) == 3 and text.layers == [0, 2, 4]
    image = InheritedImage(teacher, [1, 1, 2, 2, 2, 2, 1])
    assert [len(s) for s in image.tower.blocks] == [1, 1, 2, 2, 2, 2, 1]
    emb, pooled = image(torch.randn(2, 3, 64, 64))
    (emb.sum() + text(teacher.tokenize(["a cat"]))[0].sum()).backward()
    assert emb.shape == (2, 512) and pooled.shape == (2, 1280)
    assert image.tower.conv_stem.weight.grad is not None and teacher.image_tower.conv_stem.weight.grad is None
    with pytest.raises(UserError, match="per stage"):
        InheritedImage(teacher, [1, 0, 2, 2, 2, 2, 1])
