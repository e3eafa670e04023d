"""Student presets (spec section 3, issue "Students") and their cost.

Presets are open_clip model configs (JSON in `clipdistill/model_configs/`, named `clipdistill-<preset>`),
registered with `open_clip.add_model_config` at first use, so open_clip's own factory builds them and an
exported student reloads in plain open_clip. `student:NAME` builds one with random weights,
`student:NAME@/path/ckpt.pt` loads a checkpoint into it.

`ImageOnlyStudent` pairs a preset's image tower with a teacher's frozen text tower (any `ClipModel`),
with the student's embedding width set to the teacher's. `count_params_flops` reports parameters and
forward FLOPs (2 x multiply-adds, as `torch.utils.flop_counter` counts) per tower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from clipdistill.errors import UserError, unknown_name
from clipdistill.models.base import ClipModel, Features
from clipdistill.models.openclip import LOAD_ERRORS, OpenClipModel, first_line, quiet_open_clip

CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
OPENCLIP_PREFIX = "clipdistill-"


@dataclass(frozen=True)
class StudentPreset:
    name: str
    description: str

    @property
    def openclip_name(self) -> str:
        return OPENCLIP_PREFIX + self.name


STUDENTS: dict[str, StudentPreset] = {
    p.name: p
    for p in [
        StudentPreset("vit-t-32", "ViT-Ti/4 at 32 px (w192 d6 h3); text w256 d4 ctx32"),
        StudentPreset("vit-t-64", "ViT-Ti/8 at 64 px (w192 d6 h3); text w256 d4 ctx32"),
        StudentPreset("vit-t-128", "ViT-Ti/16 at 128 px (w192 d12 h3); text w256 d6 ctx32"),
        StudentPreset("vit-t-224", "ViT-Ti/16 at 224 px (w192 d12 h3, CLIP-KD's ViT-T/16 tower); text w256 d6 ctx77"),
        StudentPreset("vit-s-64", "ViT-S/8 at 64 px (w384 d6 h6); text w384 d4 ctx32"),
        StudentPreset("vit-s-224-p32", "ViT-S/32 at 224 px (w384 d12 h6); text w384 d6 ctx77"),
        StudentPreset("vit-s-224", "ViT-S/16 at 224 px (w384 d12 h6); text w384 d6 ctx77"),
        StudentPreset("mobilenetv3-l-224", "timm MobileNetV3-Large-100 at 224 px; text w256 d4 ctx32"),
        StudentPreset("efficientnet-lite0-224", "timm EfficientNet-Lite0 at 224 px; text w256 d4 ctx32"),
    ]
}


def list_students() -> list[str]:
    return list(STUDENTS)


def register_configs() -> None:
    """Make open_clip see the preset configs (once; called lazily, never at import)."""
    import open_clip

    known = set(open_clip.list_models())
    if any(p.openclip_name not in known for p in STUDENTS.values()):
        open_clip.add_model_config(CONFIG_DIR)


def get_preset(name: str) -> StudentPreset:
    if name not in STUDENTS:
        raise unknown_name("student preset", name, list_students())
    return STUDENTS[name]


def preset_config(name: str) -> dict:
    """The open_clip model config (a fresh copy) of a preset."""
    import open_clip

    register_configs()
    return open_clip.get_model_config(get_preset(name).openclip_name)


def create_student(name: str, *, embed_dim: int | None = None, checkpoint: str | Path | None = None) -> OpenClipModel:
    """A preset as an `OpenClipModel` (random init unless `checkpoint`); `embed_dim` overrides the config's."""
    import open_clip

    preset = get_preset(name)
    cfg = preset_config(name)
    kwargs: dict = {"pretrained_image": False, "pretrained_text": False}
    if embed_dim is not None:
        cfg["embed_dim"] = kwargs["embed_dim"] = int(embed_dim)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint '{checkpoint}' not found; pass an existing file as 'student:{name}@FILE'")
        kwargs["pretrained"] = str(path)
    with quiet_open_clip():
        try:
            model = open_clip.create_model(preset.openclip_name, **kwargs)
        except LOAD_ERRORS as err:
            raise UserError(f"cannot load checkpoint '{checkpoint}' into student {name} ({first_line(err)})") from err
        tokenizer = open_clip.get_tokenizer(preset.openclip_name)
    return OpenClipModel(model.eval(), tokenizer, name=f"student:{name}", model_cfg=cfg)


def from_spec(rest: str) -> OpenClipModel:
    """`student:NAME` or `student:NAME@/path/ckpt.pt`."""
    name, _, ckpt = rest.partition("@")
    return create_student(name, checkpoint=ckpt or None)


class ImageOnlyStudent(ClipModel):
    """A preset's image tower trained against a teacher's frozen text tower (embed_dim == teacher's).

    The text model is held as a plain attribute, not a submodule: it stays frozen and in eval mode, and
    is neither saved in the student's state dict nor handed to its optimiser.
    """

    def __init__(self, image_model: OpenClipModel, text_model: ClipModel) -> None:
        super().__init__()
        if image_model.embed_dim != text_model.embed_dim:
            raise UserError(
                f"image tower width {image_model.embed_dim} != text model width {text_model.embed_dim}; "
                "build it with image_only_student()"
            )
        self.image = image_model
        object.__setattr__(self, "text_model", text_model)
        for p in text_model.parameters():
            p.requires_grad_(False)
        self.name = f"{image_model.name}+text:{text_model.name}"
        self.embed_dim = text_model.embed_dim
        self.image_config = image_model.image_config
        self.logit_scale_param = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.train(image_model.training)

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        return self.image.image_features(images, tokens=tokens)

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        with torch.no_grad():
            return self.text_model.text_features(text, tokens=tokens)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.text_model.tokenize(texts)

    def raw_logit_scale(self) -> Tensor:
        return self.logit_scale_param


def image_only_student(preset: str, text_model: ClipModel) -> ImageOnlyStudent:
    """`preset`'s image tower (random init, width = the text model's) + `text_model`'s frozen text tower."""
    return ImageOnlyStudent(create_student(preset, embed_dim=text_model.embed_dim), text_model)


# --- cost -------------------------------------------------------------------------------------------


class _ParamRecorder(TorchFunctionMode):
    """Records which parameters a forward pass touches (to split parameter counts by tower)."""

    def __init__(self, params: dict[int, nn.Parameter]) -> None:
        super().__init__()
        self.params = params
        self.used: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, Tensor) and id(a) in self.params:
                self.used.add(id(a))
        return func(*args, **kwargs)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # The CPU flash kernel has no formula in torch's flop counter: count Q K^T and A V like the others.
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _all_params(model: nn.Module) -> dict[int, nn.Parameter]:
    params = {id(p): p for p in model.parameters()}
    for value in vars(model).values():  # unregistered modules such as ImageOnlyStudent.text_model
        if isinstance(value, nn.Module):
            params.update({id(p): p for p in value.parameters()})
    return params


def _measure(model: nn.Module, fn) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    recorder = _ParamRecorder(_all_params(model))
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    from clipdistill.models.export import no_mha_fastpath

    with torch.no_grad(), no_mha_fastpath(), counter, recorder:
        fn()
    params = sum(recorder.params[i].numel() for i in recorder.used)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


def count_params_flops(model: ClipModel, image_size: int | None = None, context: int | None = None) -> dict:
    """Parameters and forward FLOPs per sample of each tower: {"image": {...}, "text": {...}}.

    A tower's parameters are those its forward pass reads (found by tracing one sample), so the count
    works for any `ClipModel`. FLOPs are 2 x multiply-adds for one image at `image_size` (default the
    model's) and one caption padded to the tokenizer's length (or cut/padded to `context`).
    """
    size = image_size or model.image_config.size
    was_training = model.training
    model.eval()
    try:
        images = torch.zeros(1, 3, size, size, device=model.device)
        tokens = model.tokenize(["a photo of a cat on a mat."]).to(model.device)
        if context is not None:
            tokens = torch.nn.functional.pad(tokens, (0, max(0, context - tokens.shape[1])))[:, :context]
        return {
            "image": _measure(model, lambda: model.image_features(images)),
            # tokens=True keeps the padded context (open_clip's cost; the adapter's plain encode drops the padding)
            "text": _measure(model, lambda: model.text_features(tokens, tokens=True)),
        }
    finally:
        model.train(was_training)
