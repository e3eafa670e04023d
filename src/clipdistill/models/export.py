"""Shipping a student (issue "Students"): an open_clip checkpoint folder or ONNX encoders.

`export_openclip` writes what open_clip's `local-dir:` schema loads: `open_clip_config.json`
(`model_cfg` + `preprocess_cfg`) and `open_clip_pytorch_model.bin`; `open_clip.create_model(
"local-dir:DIR")` rebuilds it and gives the same embeddings (checked after writing). A pruned model
(uneven heads per layer, models/pruned.py) also records its layer sizes under `clipdistill_pruned`;
plain open_clip cannot rebuild those, `openclip:DIR` can.

`export_onnx` writes `image_encoder.onnx` (float images N x 3 x S x S -> raw embeddings N x d) and
`text_encoder.onnx` (int64 token ids N x L -> raw embeddings), batch axis dynamic, plus
`preprocess.json` (resize, crop, mean, std, interpolation, tokenizer, logit scale); onnxruntime's
outputs are checked against PyTorch's (max |diff| / max |ref| <= 1e-4).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from clipdistill.errors import UserError, error_summary
from clipdistill.models.base import ClipModel
from clipdistill.models.factory import ModelSpec, parse_spec
from clipdistill.models.openclip import CONFIG_FILE, PRUNED_KEY, OpenClipModel, quiet_open_clip
from clipdistill.paths import atomic_path

log = logging.getLogger(__name__)

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
IMAGE_ONNX, TEXT_ONNX, PREPROCESS_JSON = "image_encoder.onnx", "text_encoder.onnx", "preprocess.json"
ONNX_TOLERANCE = 1e-4
_CAPTIONS = ["a photo of a cat.", "two dogs run on the grass near a red ball", "x"]


def resolve_checkpoint(checkpoint: str, arch: str | None = None) -> str:
    """A model spec from `--checkpoint`: a spec as is, or a folder / weights file (`arch` names its architecture)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for marker, prefix in (
            (CONFIG_FILE, "openclip:local-dir:"),
            ("teacher.json", "teacher:"),
            ("config.json", "hf:"),
        ):
            if (path / marker).is_file():
                return prefix + str(path)
        raise UserError(
            f"'{checkpoint}' holds no {CONFIG_FILE}, teacher.json or config.json; pass a model folder or spec"
        )
    if path.is_file():
        if not arch:
            raise UserError(
                f"'{checkpoint}' is a weights file; name its architecture with --arch (a student preset or open_clip model)"
            )
        from clipdistill.models.students import STUDENTS

        return str(ModelSpec("student" if arch in STUDENTS else "openclip", arch, checkpoint=str(path)))
    if ":" in checkpoint:  # a spec, not a path
        return str(parse_spec(checkpoint))
    raise UserError(
        f"checkpoint '{checkpoint}' not found; pass a file, a folder or a model spec such as 'student:vit-t-32'"
    )


def load_for_export(checkpoint: str, arch: str | None = None) -> ClipModel:
    """The model behind `--checkpoint`: a training run (its folder or `checkpoints/last.pt`), else
    whatever `resolve_checkpoint` makes of it."""
    from clipdistill.models.factory import create_model

    path = Path(checkpoint).expanduser()
    run_file = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if arch is None and run_file.is_file() and run_file.suffix == ".pt":
        try:  # a training checkpoint holds config dicts and RNG states, not only tensors
            state = torch.load(run_file, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise UserError(
                f"cannot read checkpoint '{run_file}' ({error_summary(err)}); pass a training run, its "
                "checkpoints/last.pt, or a weights file with --arch"
            ) from None
        if isinstance(state, dict) and "student" in state and "config" in state:
            return _student_from_run(state, run_file)
    return create_model(resolve_checkpoint(checkpoint, arch))


def _student_from_run(state: dict, path: Path) -> ClipModel:
    from clipdistill.models.factory import create_model
    from clipdistill.models.students import build_student

    cfg = state["config"].get("student", {})
    spec, text = cfg.get("spec"), cfg.get("text", "own")
    if not spec:
        raise UserError(
            f"'{path}' names no student spec in its config; pass --checkpoint SPEC@weights instead"
        )
    rebuild = {"image_size": cfg.get("image_size"), "freeze": int(cfg.get("freeze") or 0)}
    if text == "own":
        student = build_student(spec, text, None, 0, **rebuild)
    else:
        teacher_spec = (state["config"].get("teacher") or {}).get("spec")
        if not teacher_spec:
            raise UserError(
                f"'{path}' is an image-only student trained from a cache; set teacher.spec to export its text side"
            )
        teacher = create_model(teacher_spec)
        student = build_student(spec, text, teacher, teacher.embed_dim, **rebuild)
    sparsity = cfg.get("sparsity")
    if sparsity is not None:  # automatic inheritance: the masked student, pruned as the run's end does
        from clipdistill.models.pruning import L0Config, mask_student

        student = mask_student(student, L0Config(target_sparsity=float(sparsity)))
    try:
        student.load_state_dict(state["student"])
    except RuntimeError as err:
        raise UserError(f"the weights in '{path}' do not fit {spec} ({error_summary(err)})") from err
    if sparsity is not None:
        from clipdistill.models.pruning import prune_student

        student = prune_student(student)
    return student.eval()


def _write_json(path: Path, data: dict) -> None:
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2, default=list))
    os.replace(tmp, path)


def _probe(model: ClipModel, batch: int = 3) -> tuple[Tensor, Tensor]:
    size = model.image_config.size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, model.tokenize(_CAPTIONS[:batch])


def _refuse_unexportable(model: ClipModel) -> None:
    from clipdistill.models.pruning import MaskedClip

    if isinstance(model, MaskedClip):
        raise UserError(
            "a masked (automatic-inheritance) model cannot be exported; export its prune() result"
        )


def export_openclip(model: ClipModel, out_dir: str | Path, *, verify: bool = True) -> dict:
    """Write an open_clip-loadable folder for `model`; returns {"dir", "files", "max_abs_diff"}."""
    _refuse_unexportable(model)
    if not isinstance(model, OpenClipModel) or model.model_cfg is None:
        raise UserError(
            f"'{model.name}' is not an open_clip model with a known config; export it with --format onnx instead"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"model_cfg": model.model_cfg, "preprocess_cfg": model.preprocess_cfg}
    pruned = getattr(model.model, "clipdistill_pruned", None)
    if pruned:
        info[PRUNED_KEY] = pruned
    info["clipdistill"] = {
        "source": model.name,
        "embed_dim": model.embed_dim,
        "context_length": model.context_length,
    }
    tmp = atomic_path(out / WEIGHTS_FILE)
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}, tmp)
    os.replace(tmp, out / WEIGHTS_FILE)
    _write_json(out / CONFIG_FILE, info)
    report = {"dir": str(out), "files": [CONFIG_FILE, WEIGHTS_FILE], "max_abs_diff": None}
    if verify:
        report["max_abs_diff"] = verify_openclip(model, out)
    return report


def reload_openclip(out_dir: str | Path) -> tuple[nn.Module, object]:
    """The exported folder loaded back: plain open_clip for standard models, clipdistill for pruned ones."""
    import open_clip

    out = Path(out_dir)
    if PRUNED_KEY in json.loads((out / CONFIG_FILE).read_text()):
        from clipdistill.models.openclip import load_local_dir

        loaded = load_local_dir(out)
        return loaded.model, loaded.tokenizer
    with quiet_open_clip():
        return open_clip.create_model(f"local-dir:{out}").eval(), open_clip.get_tokenizer(f"local-dir:{out}")


@torch.no_grad()
def verify_openclip(model: OpenClipModel, out_dir: Path) -> dict[str, float]:
    reloaded, tokenizer = reload_openclip(out_dir)
    images, tokens = _probe(model)
    if not torch.equal(tokenizer(_CAPTIONS).long(), tokens):
        raise RuntimeError(f"the exported tokenizer in {out_dir} differs from the model's")
    model.eval()
    source = model.model  # the same open_clip code on both sides: weights and config must round-trip exactly
    diffs = {
        "image": (reloaded.encode_image(images) - source.encode_image(images)).abs().max().item(),
        "text": (reloaded.encode_text(tokens) - source.encode_text(tokens)).abs().max().item(),
    }
    if max(diffs.values()) > 1e-6:
        raise RuntimeError(f"open_clip reload of {out_dir} differs from the model: {diffs}")
    return diffs


class _Encoder(nn.Module):
    def __init__(self, model: ClipModel, tower: str) -> None:
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x: Tensor) -> Tensor:
        if self.tower == "image":
            return self.model.image_features(x).embedding
        return self.model.text_features(x).embedding


@contextlib.contextmanager
def no_mha_fastpath():
    """Route nn.MultiheadAttention through its plain ops: the fused kernel neither exports nor counts FLOPs."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def inference_ready(model: ClipModel):
    """Eval mode and no feature caches (the composed teacher's caches are neither traceable nor timeable)."""
    was_training = model.training
    caches = {
        name: getattr(model, name) for name in ("feature_cache", "text_cache") if getattr(model, name, None)
    }
    model.eval()
    for name in caches:
        setattr(model, name, None)
    try:
        yield model
    finally:
        model.train(was_training)
        for name, cache in caches.items():
            setattr(model, name, cache)


def tokenizer_info(model: ClipModel) -> dict:
    tok = getattr(model, "tokenizer", None)
    if tok is None and hasattr(model, "text_model"):
        return tokenizer_info(model.text_model)
    info = {"class": type(tok).__name__ if tok is not None else None}
    for attr in ("context_length", "sot_token_id", "eot_token_id", "name_or_path", "pad_token_id"):
        if getattr(tok, attr, None) is not None:
            info[attr] = getattr(tok, attr)
    return info


def export_onnx(model: ClipModel, out_dir: str | Path, *, opset: int = 17, verify: bool = True) -> dict:
    """Write the image and text encoders as ONNX plus `preprocess.json`; returns {"dir", "files", "rel_error"}."""
    _refuse_unexportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with inference_ready(model), torch.no_grad(), no_mha_fastpath():
        images, tokens = _probe(model, batch=2)
        for tower, example, name, inp in (
            ("image", images, IMAGE_ONNX, "image"),
            ("text", tokens, TEXT_ONNX, "tokens"),
        ):
            tmp = atomic_path(out / name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer chatter about python values in open_clip/timm
                torch.onnx.export(
                    _Encoder(model, tower),
                    (example,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[inp],
                    output_names=["embedding"],
                    dynamic_axes={inp: {0: "batch"}, "embedding": {0: "batch"}},
                )
            os.replace(tmp, out / name)
        meta = {
            "model": getattr(model, "spec", model.name),
            "embed_dim": model.embed_dim,
            "image": {
                "input": "image",
                **model.image_config.as_dict(),
                "layout": "NCHW float32, RGB in [0, 1] then normalised",
            },
            "text": {"input": "tokens", "length": int(tokens.shape[1]), "tokenizer": tokenizer_info(model)},
            "outputs": "raw embeddings; L2-normalise both before cosine similarity",
            "logit_scale": float(model.logit_scale().item()),
            "opset": opset,
        }
    _write_json(out / PREPROCESS_JSON, meta)
    report = {"dir": str(out), "files": [IMAGE_ONNX, TEXT_ONNX, PREPROCESS_JSON], "rel_error": None}
    if verify:
        report["rel_error"] = verify_onnx(model, out)
    return report


def onnx_session(path: str | Path, threads: int | None = None, *, spinning: bool = True):
    """A CPU session; `spinning=False` makes idle workers sleep (fairer on a CPU shared with other jobs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def verify_onnx(model: ClipModel, out_dir: str | Path, tolerance: float = ONNX_TOLERANCE) -> dict[str, float]:
    """max |onnxruntime - PyTorch| / max |PyTorch| per encoder on a batch of 3 (export used 2)."""
    out = Path(out_dir)
    images, tokens = _probe(model, batch=3)
    errors = {}
    with inference_ready(model), torch.no_grad():
        for tower, name, inp, x in (
            ("image", IMAGE_ONNX, "image", images),
            ("text", TEXT_ONNX, "tokens", tokens),
        ):
            ref = _Encoder(model, tower)(x).numpy()
            got = onnx_session(out / name).run(None, {inp: x.numpy()})[0]
            errors[tower] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    if max(errors.values()) > tolerance:
        raise RuntimeError(f"onnxruntime differs from PyTorch beyond {tolerance} relative: {errors}")
    return errors
