"""The one interface every teacher and student implements: a CLIP-like image/text encoder pair.

A model owns its preprocessing (`image_config`, `preprocess`) and tokenizer (`tokenize`), the way
timm's `pretrained_cfg` travels with a timm model, so teacher and student may use different
resolutions, normalisations and tokenizers. Intermediate features (pooled pre-projection features,
image patch tokens, text token features) come back in `Features` when asked for.

Softmax CLIP models score a pair by `s v^.t^`; sigmoid (SigLIP-style) models add a learned logit bias,
`s v^.t^ + b`, and return it from `logit_bias()` (None for softmax models). The bias belongs to the
pair, not to one tower, so it lives on the model beside the scale rather than in `Features`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class ImageConfig:
    """Evaluation preprocessing: resize the short side to `resize`, centre-crop `size`, normalise."""

    size: int = 224
    resize: int | None = None  # short side before the crop; default `size`
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"

    def transform(self) -> Callable[[Image.Image], Tensor]:
        return T.Compose(
            [
                T.Resize(self.resize or self.size, interpolation=_INTERP[self.interpolation]),
                T.CenterCrop(self.size),
                _to_rgb,
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def as_dict(self) -> dict:
        return {
            "size": self.size,
            "resize": self.resize or self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass
class Features:
    """Outputs of one tower for a batch of N inputs.

    embedding: raw (unnormalised) projected embedding, N x d.
    pooled: pooled features before the projection, N x w (None when not available).
    tokens: token features, N x L x w_tok (image patch tokens or text token features), when asked.
    mask: N x L bool, True for real (non-padding) text tokens; None for images.
    """

    embedding: Tensor
    pooled: Tensor | None = None
    tokens: Tensor | None = None
    mask: Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def normalized(self) -> Tensor:
        return F.normalize(self.embedding, dim=-1)


class ClipModel(nn.Module):
    """A CLIP-like encoder pair. Subclasses implement `image_features`, `text_features`, `tokenize`
    and `raw_logit_scale`, and set `name`, `embed_dim` and `image_config`. Sigmoid models also
    override `logit_bias` and set `max_scale` to infinity (see `logit_scale`).
    """

    name: str = "model"
    embed_dim: int
    image_config: ImageConfig
    max_scale: float = 100.0

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        raise NotImplementedError

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def raw_logit_scale(self) -> Tensor:
        """The log of the scale (open_clip's `logit_scale` parameter)."""
        raise NotImplementedError

    # Derived API, shared by every adapter.
    def logit_bias(self) -> Tensor | None:
        """The learned logit bias b of a sigmoid (SigLIP-style) model as a 0-dim tensor; None for softmax models.

        A sigmoid model's pair logit is `s v^.t^ + b`. A constant added to every logit cancels in a row
        softmax, so only the sigmoid terms read it (docs/methods.md section 14).
        """
        return None

    def logit_scale(self) -> Tensor:
        """The scale s = exp(logit_scale), clamped to at most `max_scale`, as a 0-dim tensor.

        `max_scale` is 100 for softmax models (docs/methods.md section 0). Sigmoid models use theirs
        unclamped, as their own forward does (a trained SigLIP has s of about 117, and clamping it
        would shift every sigmoid probability, where it only flattens a softmax).
        """
        return self.raw_logit_scale().exp().clamp(max=self.max_scale)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        emb = self.image_features(images).embedding
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        emb = self.text_features(text).embedding
        return F.normalize(emb, dim=-1) if normalize else emb

    @property
    def preprocess(self) -> Callable[[Image.Image], Tensor]:
        """The evaluation transform built from `image_config` (memoised per config)."""
        memo = self.__dict__.get("_preprocess_memo")
        if memo is None or memo[0] != self.image_config:
            memo = (self.image_config, self.image_config.transform())
            self.__dict__["_preprocess_memo"] = memo
        return memo[1]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "embed_dim": self.embed_dim,
            "image": self.image_config.as_dict(),
            "params": sum(p.numel() for p in self.parameters()),
        }
