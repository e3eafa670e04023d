"""Recorded augmentations (docs/methods.md section 7): sample the parameters of a random view once, replay them anywhere.

MobileCLIP (apple/ml-mobileclip, `training/dr/transforms.py`) stores the random parameters of each
augmented view next to the teacher's embedding of that view, and at training time replays them on the
raw image at the student's own resolution, so student and stored teacher embedding see the same view.
This module does the same for a random resized crop, a horizontal flip and colour jitter.

A view is one row of `AUG_FIELDS` (float32): the crop box `(top, left, height, width)` in pixels of
the source image, `flip` (0 or 1), the jitter factors (brightness, contrast, saturation multiply,
hue shifts; 1, 1, 1, 0 is no jitter) and `center`. Replay order: crop, flip, jitter (at the source
resolution, so every model sees identical colours), then resize to the model's `size` and normalise
with its mean and std. A view with `center` = 1 is each model's own evaluation transform (resize the
short side, centre-crop; `ImageConfig.transform`), the un-augmented view: the policy's
`center_view` makes it the first of the K stored views, and because its tensor is exactly the one a
teacher's evaluation sees, a teacher with a feature cache (the composed teacher) already holds its
features. Jitter runs in a fixed order (torchvision's `ColorJitter` permutes it), which the policy
fingerprint pins down together with the ranges.

Randomness never comes from a global generator: `stable_seed` hashes a run seed with the sample's
identity, so a sample's views are the same in any order, on any rank and after a resume.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from clipdistill.errors import UserError

if TYPE_CHECKING:
    # models.base names the model interface; data uses it in annotations only, so it is not imported at run
    # time (data sits below models: docs/import_graph.md).
    from clipdistill.models.base import ImageConfig

AUG_FIELDS = (
    "top",
    "left",
    "height",
    "width",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "center",
)
AUG_WIDTH = len(AUG_FIELDS)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class AugmentPolicy:
    """Ranges of the random views. `scale`, `ratio`: RandomResizedCrop area fraction and aspect ratio;
    `flip`: probability of a horizontal flip; `jitter`: probability that colour jitter is applied,
    then brightness/contrast/saturation factors uniform in [1 - x, 1 + x] and a hue shift in [-hue, hue].
    `center_view`: the first of the K views of a sample is the un-augmented evaluation view.
    """

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    center_view: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        lo, hi = self.scale
        if not (len(self.scale) == 2 and 0 < lo <= hi <= 1):
            raise UserError(f"augment.scale {list(self.scale)} must be two numbers with 0 < low <= high <= 1")
        if not (len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1]):
            raise UserError(f"augment.ratio {list(self.ratio)} must be two numbers with 0 < low <= high")
        for name in ("flip", "jitter"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"augment.{name} = {getattr(self, name)} must be a probability in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"augment.{name} = {getattr(self, name)} must be in [0, 1)")
        if not 0 <= self.hue <= 0.5:
            raise UserError(f"augment.hue = {self.hue} must be in [0, 0.5]")

    @classmethod
    def from_dict(cls, spec: dict | None) -> AugmentPolicy:
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            from clipdistill.errors import did_you_mean

            raise UserError(
                f"unknown augmentation option '{unknown[0]}'; {did_you_mean(unknown[0], sorted(known))}known: {', '.join(sorted(known))}"
            )
        policy = cls(**spec)
        # The mapping as written, for a run's recorded config (`as_written`): an attribute, not a field,
        # so it takes no part in equality, the fingerprint or the options.
        object.__setattr__(policy, "_written", copy.deepcopy(spec))
        return policy

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    def as_written(self) -> dict:
        """The options as the config wrote them (`from_dict`'s mapping); every option (`as_dict`) otherwise."""
        written = self.__dict__.get("_written")
        return copy.deepcopy(written) if written is not None else self.as_dict()


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (run seed, epoch, shard name, sample key...)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _crop_box(
    rng: np.random.Generator, width: int, height: int, policy: AugmentPolicy
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box sampling (10 tries, then the largest central crop within `ratio`)."""
    area = width * height
    log_lo, log_hi = math.log(policy.ratio[0]), math.log(policy.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*policy.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < policy.ratio[0]:
        w, h = width, int(round(width / policy.ratio[0]))
    elif in_ratio > policy.ratio[1]:
        h, w = height, int(round(height * policy.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(
    policy: AugmentPolicy, width: int, height: int, k: int, rng: np.random.Generator, *, first: bool = True
) -> np.ndarray:
    """Parameters of `k` views of a `width` x `height` image: a (k, AUG_WIDTH) float32 array.

    With `policy.center_view` and `first`, row 0 is the centre (evaluation) view, the rest random.
    """
    out = np.zeros((k, AUG_WIDTH), dtype=np.float32)
    start = 0
    if policy.center_view and first and k > 0:
        out[0] = center_params(width, height)
        start = 1
    for i in range(start, k):
        top, left, h, w = _crop_box(rng, width, height, policy)
        flip = float(rng.random() < policy.flip)
        b = c = s = 1.0
        hue = 0.0
        if rng.random() < policy.jitter:
            b = rng.uniform(1 - policy.brightness, 1 + policy.brightness)
            c = rng.uniform(1 - policy.contrast, 1 + policy.contrast)
            s = rng.uniform(1 - policy.saturation, 1 + policy.saturation)
            hue = rng.uniform(-policy.hue, policy.hue)
        out[i] = (top, left, h, w, flip, b, c, s, hue, 0)
    return out


def identity_params(width: int, height: int) -> np.ndarray:
    """The whole image, unflipped, no jitter (one row)."""
    return np.array([0, 0, height, width, 0, 1, 1, 1, 0, 0], dtype=np.float32)


def center_params(width: int, height: int) -> np.ndarray:
    """The evaluation view (each model's resize + centre crop); the box is informative only."""
    side = min(width, height)
    return np.array(
        [(height - side) // 2, (width - side) // 2, side, side, 0, 1, 1, 1, 0, 1], dtype=np.float32
    )


def replay_pil(
    img: Image.Image, params: np.ndarray, size: int, interpolation: str = "bicubic"
) -> Image.Image:
    """The view described by `params` (one AUG_FIELDS row) at `size` x `size` pixels, as a PIL image."""
    top, left, h, w = (int(round(float(v))) for v in params[:4])
    flip, b, c, s, hue = (float(v) for v in params[4:9])
    if img.mode != "RGB":
        img = img.convert("RGB")
    if top < 0 or left < 0 or top + h > img.height or left + w > img.width or h <= 0 or w <= 0:
        raise ValueError(f"crop box {(top, left, h, w)} outside a {img.width}x{img.height} image")
    view = img.crop((left, top, left + w, top + h))
    if flip >= 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if b != 1.0:
        view = TF.adjust_brightness(view, b)
    if c != 1.0:
        view = TF.adjust_contrast(view, c)
    if s != 1.0:
        view = TF.adjust_saturation(view, s)
    if hue != 0.0:
        view = TF.adjust_hue(view, hue)
    return view.resize((size, size), _RESAMPLE[interpolation])


def replay(img: Image.Image, params: np.ndarray, cfg: ImageConfig) -> torch.Tensor:
    """The view described by `params` at the model's resolution and normalisation: a 3 x size x size tensor."""
    if len(params) > 9 and params[9] >= 0.5:
        return cfg.transform()(img)
    view = replay_pil(img, params, cfg.size, cfg.interpolation)
    return TF.normalize(TF.to_tensor(view), list(cfg.mean), list(cfg.std))


def replay_many(img: Image.Image, params: np.ndarray, cfg: ImageConfig) -> torch.Tensor:
    """Every view of a (k, AUG_WIDTH) array: k x 3 x size x size."""
    return torch.stack([replay(img, row, cfg) for row in np.atleast_2d(params)])
