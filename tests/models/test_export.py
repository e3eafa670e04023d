"""Export round trips: open_clip reload equality and ONNX Runtime vs PyTorch, for a ViT and a conv student."""

from __future__ import annotations

import functools
import json

import numpy as np
import open_clip
import pytest
import torch

from clipdistill.cli.main import main
from clipdistill.errors import UserError
from clipdistill.models.export import (
    export_onnx,
    export_openclip,
    load_for_export,
    onnx_session,
    resolve_checkpoint,
)
from clipdistill.models.factory import create_model
from clipdistill.models.openclip import from_config
from clipdistill.models.pruning import MaskedClip

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "vit": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": TEXT,
    },
    "conv": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "timm_model_name": "mobilenetv3_small_050", "timm_proj": ""},
        "text_cfg": TEXT,
    },
}


@functools.cache
def _model(kind: str):
    torch.manual_seed(0)
    return from_config(CONFIGS[kind], name=f"tiny-{kind}")


def _probe(model, n=4):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return x, model.tokenize(["a cat", "a dog on a mat", "red", "the end of the line"][:n])


@pytest.mark.parametrize("kind", ["vit", "conv"])
def test_openclip_round_trip(kind, tmp_path):
    model = _model(kind)
    report = export_openclip(model, tmp_path)
    assert report["max_abs_diff"] == {"image": 0.0, "text": 0.0}
    reloaded = open_clip.create_model(f"local-dir:{tmp_path}").eval()  # plain open_clip, no clipdistill code
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    x, ids = _probe(model)
    assert torch.equal(tokenizer(["a cat", "a dog on a mat", "red", "the end of the line"]), ids)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(x), model.encode_image(x))
        assert torch.equal(reloaded.encode_text(ids), model.model.encode_text(ids))
        # the adapter drops trailing padding (models/openclip.py): the same values up to float32 rounding
        assert torch.allclose(reloaded.encode_text(ids), model.encode_text(ids), atol=1e-5)
    assert reloaded.visual.preprocess_cfg["mean"] == list(model.image_config.mean)
    again = create_model(f"openclip:{tmp_path}")  # and through the adapter
    assert again.image_config == model.image_config


@pytest.mark.parametrize("kind", ["vit", "conv"])
def test_onnx_matches_pytorch(kind, tmp_path):
    model = _model(kind)
    report = export_onnx(model, tmp_path)
    assert max(report["rel_error"].values()) <= 1e-4
    x, ids = _probe(model, n=4)  # another batch size than the export's: the batch axis is dynamic
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(x).numpy(), model.encode_text(ids).numpy()
    img = onnx_session(tmp_path / "image_encoder.onnx").run(None, {"image": x.numpy()})[0]
    txt = onnx_session(tmp_path / "text_encoder.onnx").run(None, {"tokens": ids.numpy()})[0]
    assert np.abs(img - ref_img).max() <= 1e-4 * np.abs(ref_img).max()
    assert np.abs(txt - ref_txt).max() <= 1e-4 * np.abs(ref_txt).max()
    meta = json.loads((tmp_path / "preprocess.json").read_text())
    assert meta["image"]["size"] == 32 and meta["image"]["mean"] == list(model.image_config.mean)
    assert meta["text"]["length"] == 16 and meta["embed_dim"] == model.embed_dim


def test_pruned_model_round_trips(tmp_path):
    masked = MaskedClip(_model("vit")).eval()
    with torch.no_grad():
        for p in masked.log_alpha.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 3 + 1)
    with pytest.raises(UserError, match="prune"):
        export_onnx(masked, tmp_path / "masked")
    pruned = masked.prune()
    export_openclip(pruned, tmp_path / "oc")
    export_onnx(pruned, tmp_path / "onnx")
    reloaded = create_model(f"openclip:local-dir:{tmp_path / 'oc'}")
    x, ids = _probe(pruned)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(x), pruned.encode_image(x))
        assert torch.equal(reloaded.encode_text(ids), pruned.encode_text(ids))


def test_resolve_checkpoint_and_errors(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    assert resolve_checkpoint("student:vit-t-32") == "student:vit-t-32"
    assert resolve_checkpoint(str(weights), "vit-t-32") == f"student:vit-t-32@{weights}"
    assert resolve_checkpoint(str(weights), "ViT-B-32") == f"openclip:ViT-B-32@{weights}"
    with pytest.raises(UserError, match="--arch"):
        resolve_checkpoint(str(weights))
    with pytest.raises(UserError, match="holds no"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nope"))


def test_training_run_checkpoint_exports(tmp_path):
    model = _model("vit")
    export_openclip(model, tmp_path / "oc", verify=False)
    torch.manual_seed(1)
    trained = create_model(f"openclip:{tmp_path / 'oc'}")  # a "trained" student: same spec, changed weights
    with torch.no_grad():
        trained.model.logit_scale.fill_(3.0)
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save(
        {
            "step": 5,
            "student": trained.state_dict(),
            "config": {"student": {"spec": f"openclip:{tmp_path / 'oc'}", "text": "own"}},
        },
        run / "last.pt",
    )
    loaded = load_for_export(str(tmp_path / "run"))
    assert loaded.raw_logit_scale().item() == 3.0
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run / "last.pt"),
                "--format",
                "openclip",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )


def test_cli_export_onnx(tmp_path, capsys):
    export_openclip(_model("vit"), tmp_path / "oc")
    assert (
        main(
            ["export", "--checkpoint", str(tmp_path / "oc"), "--format", "onnx", "--out", str(tmp_path / "x")]
        )
        == 0
    )
    assert (tmp_path / "x" / "image_encoder.onnx").is_file()
    assert "relative error" in capsys.readouterr().out
    assert (
        main(
            ["export", "--checkpoint", str(tmp_path / "missing"), "--format", "onnx", "--out", str(tmp_path)]
        )
        == 2
    )
