"""SigLIP-style models (spec 14): a tiny random open_clip config with `init_logit_bias` and a tiny HF
`SiglipModel` saved to tmp_path load through their specs, match their own forward exactly, evaluate, and
distil; the bias is read and used. No hub access."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch
from helpers.tiny_openclip import TINY
from PIL import Image

from clipdistill.errors import UserError
from clipdistill.eval import runner
from clipdistill.losses import Distiller, Outputs, parse_loss_config
from clipdistill.models.base import ClipModel
from clipdistill.models.factory import create_model
from clipdistill.models.openclip import from_config

# open_clip's SigLIP configs (e.g. ViT-B-16-SigLIP.json) shrunk: bias and scale at SigLIP's init, a
# custom text tower without causal mask pooled at the last position, projection with a bias.
SIGLIP_CFG = {
    "embed_dim": 24,
    "init_logit_bias": -10,
    "init_logit_scale": math.log(10),
    "custom_text": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
    },
}
OC_SPEC = "openclip:cdtest-sigmoid"  # no "siglip" in the name: open_clip would fetch its SigLIP tokenizer
CAPTIONS = ["a cat", "a dog on grass", "two birds", "a red car"]


@pytest.fixture(scope="module", autouse=True)
def _register(tmp_path_factory):
    import open_clip

    if "cdtest-sigmoid" not in open_clip.list_models():
        folder = tmp_path_factory.mktemp("siglip_configs")
        (folder / "cdtest-sigmoid.json").write_text(json.dumps(SIGLIP_CFG))
        open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import CLIPTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    folder = tmp_path_factory.mktemp("hf_siglip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    text = dict(
        hidden_size=48,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_size=32,  # the text head maps width 48 to the vision width
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
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(120.0))  # above the softmax clamp of 100, as a trained SigLIP
        model.logit_bias.fill_(-7.5)
    model.save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    SiglipImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
    ).save_pretrained(folder)
    return folder


def hf_spec(folder) -> str:
    return f"hf:{folder}"


def model_outputs(model: ClipModel, images: torch.Tensor, texts: list[str]) -> Outputs:
    """What the engine hands the loss terms, with the model's bias."""
    return Outputs(
        image=model.image_features(images).embedding,
        text=model.text_features(model.tokenize(texts)).embedding,
        scale=model.logit_scale(),
        bias=model.logit_bias(),
    )


def pair_logits(model: ClipModel, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    out = model_outputs(model, images, texts)
    return out.scale * out.image_n @ out.text_n.T + out.bias


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- loading and exactness ---------------------------------------------------------------------


def test_openclip_siglip_reads_the_bias_and_matches_open_clips_forward():
    model = create_model(OC_SPEC)
    assert type(model.model).__name__ == "CustomTextCLIP"
    assert model.logit_bias().item() == -10.0 and model.logit_scale().item() == pytest.approx(10.0)
    x = images()
    with torch.no_grad():
        model.model.logit_scale.fill_(math.log(150.0))
        model.model.logit_bias.fill_(-4.0)
        img, txt, scale, bias = model.model(
            x, model.tokenize(CAPTIONS)
        )  # normalised features, exp scale, bias
        ours = pair_logits(model, x, CAPTIONS)
    assert model.logit_scale().item() == pytest.approx(150.0)  # a sigmoid model's scale is not clamped
    torch.testing.assert_close(ours, scale * img @ txt.T + bias, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        model.model.logit_bias.fill_(-6.0)
        moved = pair_logits(model, x, CAPTIONS)
    torch.testing.assert_close(moved, ours - 2.0, rtol=0, atol=1e-5)  # the bias is used


def test_softmax_models_keep_no_bias_and_the_clamp():
    model = from_config(TINY)
    assert model.logit_bias() is None and model.max_scale == 100.0
    with torch.no_grad():
        model.model.logit_scale.fill_(math.log(150.0))
    assert model.logit_scale().item() == pytest.approx(100.0)
    from clipdistill.models.hf import HFClipModel

    assert HFClipModel.logit_bias is ClipModel.logit_bias


def test_hf_siglip_matches_siglipmodel_forward(hf_folder):
    from transformers import SiglipModel

    model = create_model(hf_spec(hf_folder))
    ref = SiglipModel.from_pretrained(hf_folder).eval()
    assert type(model).__name__ == "HFSiglipModel" and model.embed_dim == 32
    assert model.logit_scale().item() == pytest.approx(120.0) and model.logit_bias().item() == -7.5
    x = images(3)
    ids = model.tokenize(CAPTIONS[:3])
    assert ids.shape == (3, 16) and (ids[:, -1] == 1).all()  # max-length padding, as SigLIP was trained
    with torch.no_grad():
        expect = ref(input_ids=ids, pixel_values=x).logits_per_image  # no attention mask: forward's default
        got = pair_logits(model, x, CAPTIONS[:3])
        f_img = model.image_features(x, tokens=True)
        f_txt = model.text_features(ids, tokens=True)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-5)
    assert f_img.embedding.shape == (3, 32) and f_img.tokens.shape == (3, 16, 32)
    assert (
        f_txt.embedding.shape == (3, 32)
        and f_txt.pooled.shape == (3, 48)
        and f_txt.tokens.shape == (3, 16, 48)
    )
    assert f_txt.mask.sum(1).tolist() == [6, 13, 10]  # sot, the letters and words, eot
    cfg = model.image_config
    assert (cfg.size, cfg.resize, cfg.interpolation, cfg.mean, cfg.std) == (
        32,
        32,
        "bicubic",
        (0.5,) * 3,
        (0.5,) * 3,
    )
    assert model.preprocess(Image.new("RGB", (32, 32), (255, 0, 0))).shape == (3, 32, 32)


def test_hf_refuses_other_model_types(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="'bert' model; the hf: adapter reads 'clip' and 'siglip'"):
        create_model(f"hf:{tmp_path}")
    with pytest.raises(UserError, match="no config.json"):
        create_model(f"hf:{tmp_path / 'missing'}")


# ---- the bias is used by the sigmoid terms -----------------------------------------------------


@pytest.mark.parametrize("which", ["openclip", "hf"])
def test_changing_the_models_bias_changes_the_sigmoid_losses(which, hf_folder):
    model = create_model(OC_SPEC if which == "openclip" else hf_spec(hf_folder))
    other = create_model(hf_spec(hf_folder) if which == "openclip" else OC_SPEC)
    distiller = Distiller(
        parse_loss_config({"siglip": 1.0, "sigmoid_kd": 1.0, "kd": 1.0}), model.embed_dim, other.embed_dim
    )
    x = images()

    def values():
        with torch.no_grad():
            _, logs = distiller(model_outputs(model, x, CAPTIONS), model_outputs(other, x, CAPTIONS))
        return logs

    before = values()
    with torch.no_grad():
        model.model.logit_bias.add_(3.0)  # the student's bias: siglip and sigmoid_kd move
    after_student = values()
    with torch.no_grad():
        other.model.logit_bias.add_(3.0)  # the teacher's bias: sigmoid_kd moves, kd (a softmax) does not
    after_teacher = values()
    assert abs(after_student["siglip"] - before["siglip"]) > 1e-3
    assert abs(after_student["sigmoid_kd"] - before["sigmoid_kd"]) > 1e-3
    assert abs(after_teacher["sigmoid_kd"] - after_student["sigmoid_kd"]) > 1e-3
    assert after_teacher["kd"] == before["kd"]


# ---- evaluate and distil -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["openclip", "hf"])
def test_zero_shot_evaluation(which, hf_folder, make_dataset):
    root = make_dataset("toy", n=10, classes=("cat", "dog", "bird", "car", "tree"))
    model = create_model(OC_SPEC if which == "openclip" else hf_spec(hf_folder))
    rec = runner.evaluate(model, "toy", data_root=root, progress=False, cache=False)
    assert rec["task"] == "zeroshot_classification" and rec["clipdistill"]["samples"] == 10
    assert set(rec["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in rec["metrics"].values())
    assert rec["metrics"]["acc5"] == 1.0  # five classes: every label is in the top 5


@pytest.mark.parametrize("which", ["openclip", "hf"])
def test_two_distillation_steps_train_the_students_bias(which, hf_folder):
    torch.manual_seed(0)
    student = create_model(OC_SPEC if which == "openclip" else hf_spec(hf_folder)).train()
    teacher = create_model(hf_spec(hf_folder) if which == "openclip" else OC_SPEC).eval()
    distiller = Distiller(
        parse_loss_config({"siglip": 1.0, "sigmoid_kd": 1.0, "kd": 1.0}), student.embed_dim, teacher.embed_dim
    )
    opt = torch.optim.AdamW([*student.parameters(), *distiller.parameters()], lr=1e-3)
    x = images()
    with torch.no_grad():
        target = model_outputs(teacher, x, CAPTIONS)
    bias_before = student.logit_bias().item()
    totals = []
    for _ in range(3):
        total, logs = distiller(model_outputs(student, x, CAPTIONS), target)
        totals.append(total.item())
        opt.zero_grad()
        total.backward()
        grad = student.model.logit_bias.grad
        assert grad is not None and grad.abs().sum() > 0  # the student's own bias is trained
        assert distiller.terms["siglip"].logit_bias.grad is None  # not the fallback
        assert all(math.isfinite(float(v)) for v in logs.values())
        opt.step()
    assert student.logit_bias().item() != bias_before
    assert totals[-1] < totals[0]


def test_engine_distils_a_siglip_student_from_a_siglip_teacher(hf_folder, make_dataset, tmp_path):
    from clipdistill.train.config import config_from_dict
    from clipdistill.train.engine import train

    root = make_dataset("caps", kind="retrieval", n=8, shards=1, split="train")
    cfg = {
        "student": {"spec": OC_SPEC},
        "teacher": {"spec": hf_spec(hf_folder)},
        "data": {
            "train": ["caps:train"],
            "root": str(root),
            "batch_size": 4,
            "workers": 0,
            "shuffle_buffer": 4,
        },
        "losses": {"siglip": 1.0, "kd": 1.0},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "steps": 2,
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "log_every": 1,
        "checkpoint_every": 2,
        "deterministic": True,
        "threads": 1,
    }
    summary = train(config_from_dict(cfg))
    assert summary["steps"] == 2 and summary["teacher_mode"] == "online"
    for key in ("loss", "siglip", "kd"):
        assert math.isfinite(summary["final"][key])
    state = torch.load(tmp_path / "run" / "student.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith("logit_bias") for k in state)  # the exported student keeps its bias
