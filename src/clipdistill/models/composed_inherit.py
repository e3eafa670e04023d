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
import math

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
        self.tower = copy.deepcopy(tower)
        self.tower.blocks = nn.Sequential(*[nn.Sequential(*stage[:d]) for stage, d in zip(self.tower.blocks, depths)])
        self.depths = list(depths)
        self.head = copy.deepcopy(teacher.image_head)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.tower.forward_head(self.tower.forward_features(x), pre_logits=True)
        return self.head(pooled), pooled


class ComposedStudent(ClipModel):
    """An inherited (or any) image tower + an inherited MiniLM text tower, in the teacher's space."""

    def __init__(self, teacher: ComposedTeacher, *, text_layers: int, image: nn.Module | None = None,
                 image_config: ImageConfig | None = None, name: str | None = None) -> None:
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

        out = self.text.tokenizer(list(texts), padding="max_length", truncation=True, max_length=TEXT_CONTEXT,
                                  return_tensors="pt")
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
