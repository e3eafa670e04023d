"""Automatic inheritance in a run (issue 22; docs/methods.md section 3): `student.sparsity` trains the
inherited student under L0 masks, prunes it at the end, ships the pruned model and exports it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import base_config

from clipdistill.errors import UserError
from clipdistill.train.config import config_from_dict

PRESET = "cdtest-tiny"  # a tiny ViT student preset; the teacher is the same architecture (inherit: equal)
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
AUTO = {
    "student.spec": f"student:{PRESET}",
    "student.init": "inherit",
    "student.sparsity": 0.5,
    "student.sparsity_warmup": 30,
    "teacher.spec": f"openclip:clipdistill-{PRESET}",
    "losses": {"clip": 1.0, "fd": 1.0},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "groups": {"l0_masks": {"lr": 0.2}, "l0_lambdas": {"lr": 0.2}}},
    "steps": 150,
    "checkpoint_every": 75,
    "log_every": 25,
}


@pytest.fixture(scope="module")
def tiny_preset():
    """`student:cdtest-tiny` (a 2-layer 32-wide ViT) and its open_clip config `clipdistill-cdtest-tiny`."""
    import open_clip

    from clipdistill.models import students

    if f"clipdistill-{PRESET}" not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="cdtest-auto-"))
        (folder / f"clipdistill-{PRESET}.json").write_text(json.dumps(TINY_CFG))
        open_clip.add_model_config(folder)
    added = PRESET not in students.STUDENTS
    students.STUDENTS[PRESET] = students.StudentPreset(PRESET, "test: ViT w32 d2 h4 at 16 px")
    yield PRESET
    if added:
        del students.STUDENTS[PRESET]


def _captions(root: Path, n: int = 24, shards: int = 2) -> Path:
    """The `caps` image-caption set of the engine tests (conftest's make_dataset), for a module fixture."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng, split = np.random.default_rng(0), root / "caps" / "train"
    split.mkdir(parents=True)
    (root / "caps" / "dataset_type.txt").write_text("retrieval")
    per = n // shards
    for s in range(shards):
        with tarfile.open(split / f"{s}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(
                    buf, format="PNG"
                )
                for name, data in (
                    (f"s{i:07d}.png", buf.getvalue()),
                    (f"s{i:07d}.txt", f"caption {i} one\ncaption {i} two".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (split / "nshards.txt").write_text(str(shards))
    return root


@pytest.fixture(scope="module")
def auto_run(tiny_preset, tmp_path_factory):
    """One automatic-inheritance run (150 steps of a tiny ViT, sparsity 0.5 over a 30-step ramp); its folder."""
    from tiny_models import register

    from clipdistill.train.engine import train

    register()
    tmp = tmp_path_factory.mktemp("auto")
    root = _captions(tmp / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(config_from_dict(base_config(root, tmp / "run", **AUTO)))
    finally:
        torch.set_num_threads(threads)
    return tmp / "run", summary


@pytest.mark.slow
def test_auto_inheritance_reaches_its_target_sparsity(auto_run):
    run, summary = auto_run
    record = json.loads((run / "summary.json").read_text())["sparsity"]
    assert record == summary["sparsity"]
    assert record["target"] == 0.5 and record["warmup_steps"] == 30
    for tower in ("image", "text"):
        assert abs(record["expected"][tower] - 0.5) <= 0.02, record
        assert record["params_after"][tower] < record["params_before"][tower]
    assert summary["student_init"]["sparsity"] == 0.5
    assert "l0/penalty" in summary["final"] and summary["final"]["l0/target"] == 0.5


@pytest.mark.slow
def test_pruned_student_equals_the_masked_model_and_reloads(auto_run):
    """The run's last checkpoint (masked) pruned equals the masked model in eval mode; the run's
    student.pt / student_reload_spec rebuild the pruned architecture with the same outputs."""
    from clipdistill.models.export import load_for_export
    from clipdistill.models.factory import create_model
    from clipdistill.models.pruning import L0Config, MaskedClip, prune_student
    from clipdistill.models.students import build_student

    run, _ = auto_run
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    masked = MaskedClip(build_student(f"student:{PRESET}", "own", None, 0), L0Config(target_sparsity=0.5))
    masked.load_state_dict(ckpt["student"])
    masked.eval()
    pruned = prune_student(masked)
    assert pruned.model.visual.transformer.resblocks[0].ln_1.weight.shape[0] < 32 or any(
        b.attn.num_heads < 4 for b in pruned.model.visual.transformer.resblocks
    )
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = masked.tokenize(["a dog on grass", "a red car", "x"])
    with torch.no_grad():
        want_i, want_t = masked.image_features(images).embedding, masked.text_features(tokens).embedding
        torch.testing.assert_close(pruned.image_features(images).embedding, want_i, rtol=0, atol=1e-5)
        torch.testing.assert_close(pruned.text_features(tokens).embedding, want_t, rtol=0, atol=1e-5)
        shipped = torch.load(run / "student.pt", map_location="cpu")
        assert shipped.keys() == pruned.model.state_dict().keys()
        spec = json.loads((run / "summary.json").read_text())["student_reload_spec"]
        assert spec.startswith("openclip:") and spec.endswith("student_pruned")
        for model in (create_model(spec), load_for_export(str(run))):
            torch.testing.assert_close(model.image_features(images).embedding, want_i, rtol=0, atol=1e-5)
            torch.testing.assert_close(model.text_features(tokens).embedding, want_t, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_of_an_auto_run_writes_the_pruned_model(auto_run, tmp_path):
    """`clipdistill export --checkpoint RUN` (models.export): open_clip and ONNX folders of the pruned student."""
    from clipdistill.models.export import export_onnx, export_openclip, load_for_export, onnx_session
    from clipdistill.models.openclip import PRUNED_KEY, load_local_dir

    run, _ = auto_run
    student = load_for_export(str(run))
    assert getattr(student.model, PRUNED_KEY)["image"]["width"] <= 32
    report = export_openclip(student, tmp_path / "oc")
    assert max(report["max_abs_diff"].values()) <= 1e-6
    reloaded = load_local_dir(tmp_path / "oc")
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = student.image_features(images).embedding
        torch.testing.assert_close(reloaded.image_features(images).embedding, want, rtol=0, atol=1e-5)
    onnx = export_onnx(student, tmp_path / "onnx")
    assert max(onnx["rel_error"].values()) <= 1e-4
    got = onnx_session(tmp_path / "onnx" / "image_encoder.onnx").run(None, {"image": images.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"student.sparsity": 1.0}, "student.sparsity = 1 must be between 0 and 1 (exclusive)"),
        ({"student.sparsity": 0}, "student.sparsity = 0 must be between 0 and 1 (exclusive)"),
        ({"student.sparsity": -0.2}, "must be between 0 and 1"),
        ({"student.sparsity": "half"}, "student.sparsity = 'half' must be a number"),
        ({"student.sparsity_warmup": -1}, "student.sparsity_warmup = -1 must be >= 0"),
        ({"student.init": "random"}, "needs student.init = inherit, not 'random'"),
        ({"student.sparsity": None}, "student.sparsity_warmup applies to automatic inheritance"),
        ({"student.spec": "openclip:cdtest-vit", "student.init": "random"}, "needs student.init = inherit"),
        ({"teacher.spec": "fake:24"}, "set teacher.spec = openclip:"),
    ],
)
def test_bad_sparsity_is_refused_at_load(tiny, tiny_preset, caption_root, tmp_path, changes, message):
    raw = base_config(caption_root, tmp_path / "run", **{**AUTO, **changes})
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        config_from_dict(raw)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_sparsity_defaults_to_manual_inheritance(tiny, tiny_preset, caption_root, tmp_path):
    raw = base_config(caption_root, tmp_path / "run", **AUTO)
    del raw["student"]["sparsity"], raw["student"]["sparsity_warmup"]
    with pytest.raises(UserError, match="unknown optimiser group 'l0_masks'"):  # no masks without sparsity
        config_from_dict(raw)
    del raw["optim"]["groups"]
    cfg = config_from_dict(raw)
    assert cfg.student.sparsity is None and cfg.student.sparsity_warmup is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("student.sparsity=1.5", ("student.sparsity = 1.5", "between 0 and 1")),
        ("student.init=random", ("student.sparsity", "student.init = inherit")),
    ],
)
def test_cli_refuses_bad_sparsity_with_one_line(
    tiny, tiny_preset, caption_root, tmp_path, capsys, override, words
):
    import yaml

    from clipdistill.cli.main import main

    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump(base_config(caption_root, tmp_path / "run", **AUTO)))
    rc = main(["distill", "--config", str(config), override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_auto_run_resumes_bit_exactly(tiny, tiny_preset, caption_root, tmp_path, monkeypatch):
    """Masks and lambdas are in the checkpoint (the masked student's state) with their optimiser state:
    a run stopped after its step-4 checkpoint and resumed ships the uninterrupted run's pruned student."""
    from clipdistill.train import engine
    from clipdistill.train.signals import Terminated

    changes = {**AUTO, "steps": 8, "checkpoint_every": 4, "student.sparsity_warmup": 4, "log_every": 4}
    engine.train(config_from_dict(base_config(caption_root, tmp_path / "ref", **changes)))
    step = engine.Run.train_step

    def stop_at_5(self, *args, **kwargs):
        if self.step == 5:
            raise Terminated()
        return step(self, *args, **kwargs)

    cfg = config_from_dict(base_config(caption_root, tmp_path / "run", **changes))
    with monkeypatch.context() as m:
        m.setattr(engine.Run, "train_step", stop_at_5)
        with pytest.raises(SystemExit):
            engine.train(cfg)
    assert not (tmp_path / "run" / "summary.json").exists()
    summary = engine.train(cfg, resume=True)
    assert summary["steps_this_session"] == 4
    ref, got = (torch.load(tmp_path / d / "student.pt", weights_only=True) for d in ("ref", "run"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    want = json.loads((tmp_path / "ref" / "summary.json").read_text())["sparsity"]
    assert summary["sparsity"] == want
