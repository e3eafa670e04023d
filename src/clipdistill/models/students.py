"""Student presets (docs/methods.md section 3) and their cost.

Presets are open_clip model configs (JSON in `clipdistill/model_configs/`, named `clipdistill-<preset>`),
registered with `open_clip.add_model_config` at first use, so open_clip's own factory builds them and an
exported student reloads in plain open_clip. `student:NAME` builds one with random weights,
`student:NAME@/path/ckpt.pt` loads a checkpoint into it. The inherited presets (`inherited-lite2...`, cut
from the composed teacher) are named and built in `models.inherited_presets`.

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
from clipdistill.models.base import ClipModel, Features, ImageConfig
from clipdistill.models.inherited_presets import (  # noqa: F401  (parse_inherited: re-exported)
    create_inherited,
    is_inherited,
    parse_inherited,
)
from clipdistill.models.openclip import LOAD_ERRORS, OpenClipModel, first_line, quiet_open_clip

CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
OPENCLIP_PREFIX = "clipdistill-"


@dataclass(frozen=True)
class StudentPreset:
    name: str
    description: str
    # open_clip preprocess overrides (e.g. the pretrained trunk's normalisation); None: open_clip's defaults
    preprocess: dict | None = None

    @property
    def openclip_name(self) -> str:
        return OPENCLIP_PREFIX + self.name


STUDENTS: dict[str, StudentPreset] = {
    p.name: p
    for p in [
        StudentPreset("vit-t-32", "ViT-Ti/4 at 32 px (w192 d6 h3); text w256 d4 ctx32"),
        StudentPreset("vit-t-64", "ViT-Ti/8 at 64 px (w192 d6 h3); text w256 d4 ctx32"),
        StudentPreset("vit-t-128", "ViT-Ti/16 at 128 px (w192 d12 h3); text w256 d6 ctx32"),
        StudentPreset(
            "vit-t-224", "ViT-Ti/16 at 224 px (w192 d12 h3, CLIP-KD's ViT-T/16 tower); text w256 d6 ctx77"
        ),
        StudentPreset("vit-s-64", "ViT-S/8 at 64 px (w384 d6 h6); text w384 d4 ctx32"),
        StudentPreset("vit-s-224-p32", "ViT-S/32 at 224 px (w384 d12 h6); text w384 d6 ctx77"),
        StudentPreset("vit-s-224", "ViT-S/16 at 224 px (w384 d12 h6); text w384 d6 ctx77"),
        StudentPreset("mobilenetv3-l-224", "timm MobileNetV3-Large-100 at 224 px; text w256 d4 ctx32"),
        StudentPreset("efficientnet-lite0-224", "timm EfficientNet-Lite0 at 224 px; text w256 d4 ctx32"),
        StudentPreset(
            "efficientnet-lite0",
            "timm tf_EfficientNet-Lite0 (TF padding, takes the ImageNet weights on PyPI) "
            "at 224 px, linear head with bias; text w256 d4 ctx32",
            preprocess={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        ),
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


INITS = ("random", "pretrained", "inherit")


def init_choices(name: str) -> list[str]:
    """The `student.init` values preset `name` can take (pretrained: a timm trunk with registered weights;
    inherit: a ViT preset, from an open_clip ViT teacher, or an inherited preset, from the composed teacher)."""
    from clipdistill.models.trunks import PYPI_WEIGHTS

    if is_inherited(name):
        return ["inherit"]
    vision = preset_config(name)["vision_cfg"]
    choices = ["random"]
    if vision.get("timm_model_name") in PYPI_WEIGHTS:
        choices.append("pretrained")
    if "timm_model_name" not in vision:
        choices.append("inherit")
    return choices


def check_init(name: str, init: str) -> None:
    """One line naming the valid choices when preset `name` cannot start from `init`."""
    if init not in INITS:
        raise unknown_name("student.init", init, INITS)
    valid = init_choices(name)
    if init not in valid:
        raise UserError(
            f"student preset {name} cannot take init '{init}'; valid for it: {', '.join(valid)}"
            + ("" if init != "pretrained" else f" (pretrained presets: {', '.join(pretrained_presets())})")
        )


def pretrained_presets() -> list[str]:
    return [n for n in STUDENTS if "pretrained" in init_choices(n)]


def create_student(
    name: str,
    *,
    embed_dim: int | None = None,
    checkpoint: str | Path | None = None,
    init: str = "random",
    image_size: int | None = None,
    weights: str = "pypi",
    teacher: ClipModel | None = None,
) -> OpenClipModel:
    """A preset as an `OpenClipModel`; `embed_dim` and `image_size` override the config's.

    Weights: `checkpoint` when given (a trained student: `init` is then moot), else by `init`: random;
    pretrained (the image trunk's ImageNet weights from `weights`: "pypi", a local file or a timm tag,
    see `models.trunks`); inherit (TinyCLIP manual inheritance from `teacher`, an open_clip ViT model).
    """
    import open_clip

    if is_inherited(name):
        if checkpoint is None:
            check_init(name, init)
        return create_inherited(
            name, embed_dim=embed_dim, checkpoint=checkpoint, image_size=image_size, teacher=teacher
        )
    preset = get_preset(name)
    check_init(name, init)
    cfg = preset_config(name)
    kwargs: dict = {"pretrained_image": False, "pretrained_text": False}
    if embed_dim is not None:
        cfg["embed_dim"] = kwargs["embed_dim"] = int(embed_dim)
    if image_size is not None:
        if int(image_size) < 16:
            raise UserError(f"student.image_size = {image_size} is too small; use 32 or more pixels")
        cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"] = int(image_size)
        patch = cfg["vision_cfg"].get("patch_size")
        if patch and int(image_size) % patch:
            raise UserError(
                f"student.image_size = {image_size} is not a multiple of {name}'s patch size {patch}"
            )
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UserError(
                f"checkpoint '{checkpoint}' not found; pass an existing file as 'student:{name}@FILE'"
            )
        kwargs["pretrained"] = str(path)
    if preset.preprocess:
        kwargs["force_preprocess_cfg"] = dict(preset.preprocess)
    with quiet_open_clip():
        try:
            model = open_clip.create_model(preset.openclip_name, **kwargs)
        except LOAD_ERRORS as err:
            raise UserError(
                f"cannot load checkpoint '{checkpoint}' into student {name} ({first_line(err)})"
            ) from err
        tokenizer = open_clip.get_tokenizer(preset.openclip_name)
    student = OpenClipModel(model.eval(), tokenizer, name=f"student:{name}", model_cfg=cfg)
    if checkpoint is None and init == "pretrained":
        from clipdistill.models.trunks import load_into_trunk, pretrained_classifier

        load_into_trunk(
            model.visual.trunk, pretrained_classifier(cfg["vision_cfg"]["timm_model_name"], weights)
        )
    elif checkpoint is None and init == "inherit":
        from clipdistill.models.inherit import inherit_manual

        if teacher is None or not isinstance(teacher, OpenClipModel):
            raise UserError(
                f"init 'inherit' for {name} needs an open_clip ViT teacher (teacher.spec: openclip:...); "
                "valid for this teacher: " + ", ".join(c for c in init_choices(name) if c != "inherit")
            )
        inherit_manual(teacher, student)
    return student


def from_spec(rest: str) -> OpenClipModel:
    """`student:NAME` or `student:NAME@/path/ckpt.pt`."""
    from clipdistill.models.factory import parse_spec

    spec = parse_spec(f"student:{rest}")
    return create_student(spec.name, checkpoint=spec.checkpoint)


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


class CachedTextStandIn(ClipModel):
    """The text side of an image-only student trained from a teacher cache: its text embeddings are the
    cached teacher ones, so there is no text tower to run (evaluation swaps in the real teacher)."""

    def __init__(self, embed_dim: int, name: str = "cached-teacher-text") -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.name = name
        self.image_config = ImageConfig()

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        raise UserError(
            "this student's text tower is the cached teacher's; build the teacher (teacher.spec) to encode text"
        )

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.text_features(torch.empty(0)).embedding

    def raw_logit_scale(self) -> Tensor:
        return torch.tensor(0.0)


def build_student(
    spec: str,
    text: str,
    teacher: ClipModel | None,
    teacher_dim: int,
    *,
    init: str = "random",
    weights: str = "pypi",
    image_size: int | None = None,
    freeze: int = 0,
) -> ClipModel:
    """The student of a run (also rebuilt from a run's config for evaluation and export).

    text="own": any model spec with its own text tower; text="teacher": a preset's image tower at the
    teacher's width with the teacher's frozen text tower (docs/methods.md section 5, ComKD-CLIP setting). A preset
    starts from `init` (random, pretrained or inherit; a `@ckpt` in the spec overrides it) at
    `image_size`, with its first `freeze` image-trunk blocks frozen (`models.freeze`).
    """
    from clipdistill.models.factory import create_model, parse_spec
    from clipdistill.models.freeze import freeze_prefix

    parsed = parse_spec(spec)
    if parsed.kind != "student":
        if text != "own" or init != "random" or image_size is not None or freeze:
            raise UserError(
                f"student.text = teacher, init, image_size and freeze need a preset student (student:NAME), not {spec}"
            )
        return create_model(spec)
    name, ckpt = parsed.name, parsed.checkpoint
    own = text == "own"
    model = create_student(
        name,
        embed_dim=None if own else teacher_dim,
        checkpoint=ckpt,
        init=init,
        weights=weights,
        image_size=image_size,
        teacher=teacher,
    )
    model.spec = spec
    freeze_prefix(model, freeze)
    if own:
        return model
    if is_inherited(name):
        for p in [*model.text.parameters(), model.raw_logit_scale()]:
            p.requires_grad_(False)  # the inherited text tower and scale are never used beside the teacher's
    else:
        for pname, p in model.model.named_parameters():
            if not pname.startswith("visual."):
                p.requires_grad_(False)  # the preset's own text tower and scale are never used
    student = ImageOnlyStudent(model, teacher if teacher is not None else CachedTextStandIn(teacher_dim))
    student.spec = spec
    return student


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
