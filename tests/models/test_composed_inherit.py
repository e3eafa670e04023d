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
    student = ComposedStudent(
        teacher, text_layers=6, image=InheritedImage(teacher, [1, 3, 3, 4, 4, 5, 1])
    ).eval()
    with torch.no_grad():
        assert torch.equal(student.text_features(ids).embedding, teacher.text_features(ids).embedding)
        assert torch.equal(student.image_features(x).embedding, teacher.image_features(x).embedding)
        assert torch.equal(student.tokenize(captions), ids)


def test_fewer_layers_and_blocks_run_and_train(teacher):
    text = inherit_text(teacher, 3)
    assert len(text.bert.encoder.layer) == 3 and text.layers == [0, 2, 4]
    image = InheritedImage(teacher, [1, 1, 2, 2, 2, 2, 1])
    assert [len(s) for s in image.trunk.blocks] == [1, 1, 2, 2, 2, 2, 1]
    emb, pooled = image(torch.randn(2, 3, 64, 64))
    (emb.sum() + text(teacher.tokenize(["a cat"]))[0].sum()).backward()
    assert emb.shape == (2, 512) and pooled.shape == (2, 1280)
    assert image.trunk.conv_stem.weight.grad is not None and teacher.image_tower.conv_stem.weight.grad is None
    with pytest.raises(UserError, match="per stage"):
        InheritedImage(teacher, [1, 0, 2, 2, 2, 2, 1])


def test_inherited_image_student_at_lower_resolution_splits_into_prefix_and_suffix(teacher):
    from clipdistill.models.composed_inherit import inherited_image_student
    from clipdistill.models.freeze import freeze_prefix, split_image_tower

    student = inherited_image_student(teacher, image_size=64).eval()
    assert student.image_config.size == 64
    assert student.image_config.resize == round(
        64 * (teacher.image_config.resize or teacher.image_config.size) / teacher.image_config.size
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # full depth at the same input: the teacher's image embedding exactly
        assert torch.equal(student.image_features(x).embedding, teacher.image_features(x).embedding)
        freeze_prefix(student, 3)
        prefix, suffix = split_image_tower(student, 3)
        torch.testing.assert_close(
            suffix(prefix(x)), student.image_features(x).embedding, rtol=1e-5, atol=1e-5
        )
    assert not any(p.requires_grad for p in prefix.parameters())
    assert all(p.requires_grad for p in suffix.blocks.parameters())


def test_inherited_preset_is_cut_from_the_teacher_and_reloads_from_its_checkpoint(teacher, tmp_path):
    from clipdistill.models.composed_inherit import save_inherited
    from clipdistill.models.factory import create_model
    from clipdistill.models.students import create_student, init_choices

    assert init_choices("inherited-lite2") == ["inherit"] and init_choices("inherited-lite2-t3") == [
        "inherit"
    ]
    student = create_student("inherited-lite2-t3", init="inherit", teacher=teacher, image_size=64).eval()
    assert student.image_config.size == 64 and student.text.layers == [0, 2, 4]
    with torch.no_grad():
        student.image.head.bias.add_(0.5)  # "trained": no longer the teacher's
    save_inherited(student, tmp_path / "student.pt")
    reloaded = create_model(f"student:inherited-lite2-t3@{tmp_path / 'student.pt'}")
    x = torch.randn(2, 3, 64, 64)
    ids = student.tokenize(["a dog runs on the grass .", "a red car"])
    with torch.no_grad():
        assert torch.equal(reloaded.image_features(x).embedding, student.image_features(x).embedding)
        assert torch.equal(reloaded.text_features(ids).embedding, student.text_features(ids).embedding)
    assert reloaded.image_config == student.image_config


def test_inherited_preset_refuses_what_it_cannot_take(teacher, tmp_path):
    from clipdistill.models.students import check_init, create_student

    with pytest.raises(UserError, match=r"cannot take init 'random'; valid for it: inherit"):
        check_init("inherited-lite2", "random")
    with pytest.raises(UserError, match="set teacher.spec = teacher:FOLDER"):
        create_student("inherited-lite2", init="inherit", teacher=None)
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        create_student("inherited-lite2", checkpoint=tmp_path / "other.pt")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not an inherited student's checkpoint"):
        create_student("inherited-lite2", checkpoint=tmp_path / "plain.pt")


def test_inherited_preset_with_fewer_blocks_per_stage_is_named_cut_and_reloaded(teacher, tmp_path):
    from clipdistill.models.composed_inherit import save_inherited
    from clipdistill.models.factory import create_model
    from clipdistill.models.students import create_student, is_inherited, parse_inherited

    assert parse_inherited("inherited-lite2") == (None, None)
    assert parse_inherited("inherited-lite2-d1334221-t2") == ([1, 3, 3, 4, 2, 2, 1], 2)
    assert parse_inherited("inherited-lite2-d1334221") == ([1, 3, 3, 4, 2, 2, 1], None)
    assert not is_inherited("inherited-lite2-t2-d1334221") and not is_inherited("inherited-lite2-x")
    name = "inherited-lite2-d1334221-t2"
    student = create_student(name, init="inherit", teacher=teacher, image_size=64).eval()
    assert [len(s) for s in student.image.trunk.blocks] == [1, 3, 3, 4, 2, 2, 1]
    assert student.text.layers == [0, 3]
    for a, b in zip(student.image.trunk.blocks[5], teacher.image_tower.blocks[5]):  # the first blocks kept
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    save_inherited(student, tmp_path / "student.pt")
    reloaded = create_model(f"student:{name}@{tmp_path / 'student.pt'}")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.image_features(x).embedding, student.image_features(x).embedding)
    with pytest.raises(UserError, match="holds image depths 1334221, not 1334451"):
        create_student("inherited-lite2-d1334451-t2", checkpoint=tmp_path / "student.pt")
    with pytest.raises(UserError, match=r"must keep 1\.\.\[1, 3, 3, 4, 4, 5, 1\] blocks per stage"):
        create_student("inherited-lite2-d1334291", init="inherit", teacher=teacher)
