"""Student presets, the image-only student, parameter/FLOP counts, and the latency report."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from helpers.imports import fresh_import
from helpers.tiny_openclip import TINY

from clipdistill.cli.main import main
from clipdistill.errors import UserError
from clipdistill.models.export import export_openclip
from clipdistill.models.factory import create_model
from clipdistill.models.latency import bench_latency, latency_table, pareto_front, pareto_plot
from clipdistill.models.openclip import from_config
from clipdistill.models.students import (
    STUDENTS,
    count_params_flops,
    create_student,
    image_only_student,
    list_students,
    preset_config,
)


def test_presets_cover_the_spec_ranges():
    vits = [
        preset_config(n) for n in list_students() if "timm_model_name" not in preset_config(n)["vision_cfg"]
    ]
    convs = [preset_config(n) for n in list_students() if "timm_model_name" in preset_config(n)["vision_cfg"]]
    sizes = {c["vision_cfg"]["image_size"] for c in vits}
    assert min(sizes) == 32 and max(sizes) == 224
    assert {c["vision_cfg"]["width"] for c in vits} == {192, 384}
    assert all(c["vision_cfg"]["image_size"] % c["vision_cfg"]["patch_size"] == 0 for c in vits)
    assert {c["vision_cfg"]["timm_model_name"] for c in convs} >= {"mobilenetv3_large_100"}
    texts = [preset_config(n)["text_cfg"] for n in list_students()]
    assert all(
        256 <= t["width"] <= 384 and 4 <= t["layers"] <= 6 and 32 <= t["context_length"] <= 77 for t in texts
    )


def test_configs_register_lazily_not_at_import(monkeypatch):
    def ours() -> list[str]:
        return [m for m in open_clip.list_models() if m.startswith("clipdistill-")]

    # open_clip as before any preset was used (the suite's earlier tests registered them)
    monkeypatch.setattr(
        open_clip.factory,
        "_MODEL_CONFIGS",
        {k: v for k, v in open_clip.factory._MODEL_CONFIGS.items() if k not in ours()},
    )
    with fresh_import("clipdistill.models.students"):
        assert ours() == []
    create_student("vit-t-32")
    assert "clipdistill-vit-t-32" in ours()  # open_clip's own factory now builds it


def test_student_spec_and_errors():
    torch.manual_seed(0)
    model = create_model("student:vit-t-32")
    assert model.embed_dim == 256 and model.image_config.size == 32 and model.context_length == 32
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    with pytest.raises(UserError, match="did you mean 'vit-t-32'"):
        create_model("student:vit-t-23")
    with pytest.raises(UserError, match="not found"):
        create_model("student:vit-t-32@/no/such/file.pt")


def _flops_by_hand(tokens: int, width: int, layers: int, mlp: int, out: int) -> int:
    per_layer = 2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
    per_layer += 2 * 2 * tokens * width * mlp
    return layers * per_layer + 2 * width * out


def test_count_params_flops_by_hand():
    model = from_config(TINY)
    cost = count_params_flops(model)
    total = sum(p.numel() for p in model.parameters())
    assert cost["image"]["params"] == sum(p.numel() for p in model.model.visual.parameters())
    assert cost["image"]["params"] + cost["text"]["params"] + 1 == total  # + logit_scale
    patch = 2 * 16 * 64 * 3 * 8 * 8  # 4x4 patches, 3x8x8 inputs each
    assert cost["image"]["flops"] == patch + _flops_by_hand(17, 64, 2, 256, 24)
    assert cost["text"]["flops"] == _flops_by_hand(16, 64, 2, 256, 24)


def test_image_only_student_reuses_frozen_text_tower():
    torch.manual_seed(0)
    teacher = from_config(TINY)
    student = image_only_student("vit-t-32", teacher)
    assert student.embed_dim == 24 and student.image_config.size == 32
    ids = student.tokenize(["a cat"])
    assert torch.equal(student.encode_text(ids), teacher.encode_text(ids).detach())
    assert not any(k.startswith("text_model") for k in student.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    emb = student.encode_image(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 24) and emb.requires_grad
    cost = count_params_flops(student)
    assert cost["text"]["params"] == count_params_flops(teacher)["text"]["params"]


def test_cli_lists_presets(capsys):
    assert main(["students", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in STUDENTS)


def test_bench_latency_table_and_pareto(tmp_path, capsys):
    torch.manual_seed(0)
    export_openclip(from_config(TINY), tmp_path / "tiny", verify=False)
    spec = f"openclip:{tmp_path / 'tiny'}"
    rows = bench_latency([spec], threads=1, batch_sizes=(1, 2), warmup=0, repeats=1, repeats_large=1)
    assert [r["tower"] for r in rows] == ["image", "text"]
    for r in rows:
        assert r["torch_ms_b1"] > 0 and r["onnx_ms_b2"] > 0 and r["onnx_per_s"] > 0 and r["flops"] > 0
    table = latency_table(rows)
    assert table.count("\n") == 4 and "ORT b2 ms" in table
    result = {
        "dataset": "cifar10",
        "model": spec,
        "pretrained": "",
        "task": "zeroshot_classification",
        "metrics": {"acc1": 0.25},
    }
    (tmp_path / "r.json").write_text(json.dumps(result))
    out = tmp_path / "p.png"
    assert (
        main(
            [
                "bench-latency",
                "--model",
                spec,
                "--threads",
                "1",
                "--batch-sizes",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--towers",
                "image",
                "--results",
                str(tmp_path / "*.json"),
                "--plot",
                str(out),
                "--json",
                str(tmp_path / "l.json"),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "l.json").read_text())["rows"][0]["model"] == spec
    assert pareto_plot(rows, {spec: {"cifar10": 0.25}}, tmp_path / "q.png") == 1
    assert main(["bench-latency"]) == 2
    assert "no model to time" in capsys.readouterr().err


def test_pareto_front():
    # (latency, accuracy): the 2nd is slower and worse than the 1st; the 4th is slowest but best
    assert pareto_front([(1.0, 50.0), (2.0, 40.0), (3.0, 60.0), (5.0, 70.0), (0.5, 10.0)]) == [4, 0, 2, 3]
