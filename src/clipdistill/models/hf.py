"""Hugging Face transformers adapters (issue "Foundation"): `hf:/local/dir` or `hf:org/name`.

The folder (or hub repo) holds what `save_pretrained` writes: the model, its tokenizer and, when present,
`preprocessor_config.json`, from which the evaluation preprocessing is taken. The model type is read from
`config.json` (`model_type`): `clip` loads a `CLIPModel` (`HFClipModel`), `siglip` a `SiglipModel`
(`HFSiglipModel`; SigLIP 2's fixed-resolution checkpoints are `siglip` models too).

CLIP features: `pooled` is the vision `pooler_output` (class token after `post_layernorm`) and the text
`pooler_output` (the end-of-text token after `final_layer_norm`), both before the projection; image
patch tokens also go through `post_layernorm`, matching open_clip's `ln_post` on tokens.

SigLIP features follow `SiglipModel.forward` exactly: the text tower runs without an attention mask
(its default; the model was trained on max-length padding) and pools the last position; the image
embedding is the attention-pooling head's output. Logits are `s v^.t^ + b` with the unclamped scale
and the learned bias (docs/methods.md section 14). Preprocessing: `SiglipImageProcessor` resizes to a
square without keeping the aspect ratio; `ImageConfig` resizes the short side and centre-crops, which
is the same on square images only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel, Features, ImageConfig
from clipdistill.models.openclip import first_line

log = logging.getLogger(__name__)

# PIL resample codes used by transformers image processors.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _size_field(value, keys: tuple[str, ...], default: int) -> int:
    """An int from a processor size entry: an int, a dict or transformers' `SizeDict`."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return int(value)
    for key in keys:
        v = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if v is not None:
            return int(v)
    return default


def image_config_from_processor(processor, default_size: int) -> ImageConfig:
    """`ImageConfig` from a `CLIPImageProcessor` (None: CLIP defaults at the vision config's size)."""
    if processor is None:
        return ImageConfig(size=default_size, resize=default_size)
    crop_px = _size_field(getattr(processor, "crop_size", None), ("height",), default_size)
    resize = _size_field(getattr(processor, "size", None), ("shortest_edge", "height"), crop_px)
    resample = getattr(processor, "resample", 3)
    return ImageConfig(
        size=crop_px if getattr(processor, "do_center_crop", True) else resize,
        resize=resize,
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
        interpolation=_RESAMPLE.get(int(getattr(resample, "value", resample)), "bicubic"),
    )


class _HFModel(ClipModel):
    """What the transformers adapters share: the wrapped model, its tokenizer (max-length padding) and scale."""

    def __init__(self, model, tokenizer, image_config: ImageConfig, *, name: str, eos_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.image_config = image_config
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.eos_token_id = int(eos_token_id)

    def tokenize(self, texts: list[str]) -> Tensor:
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"].long()

    def raw_logit_scale(self) -> Tensor:
        return self.model.logit_scale.reshape(())


class HFClipModel(_HFModel):
    """Wraps a transformers `CLIPModel` (`self.model`) and its tokenizer."""

    def __init__(self, model, tokenizer, image_config: ImageConfig, *, name: str) -> None:
        eos = model.config.text_config.eos_token_id
        super().__init__(model, tokenizer, image_config, name=name, eos_token_id=eos)
        self.embed_dim = int(model.config.projection_dim)
        self.train(model.training)

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        vision = self.model.vision_model
        out = vision(pixel_values=images)
        pooled = out.pooler_output
        emb = self.model.visual_projection(pooled)
        tok = vision.post_layernorm(out.last_hidden_state[:, 1:]) if tokens else None
        return Features(embedding=emb, pooled=pooled, tokens=tok)

    def text_mask(self, ids: Tensor) -> Tensor:
        """Real tokens: everything up to and including the first end-of-text token.

        Mirrors transformers' pooling rule (argmax of the ids for legacy configs with eos id 2),
        so the mask never depends on the pad id (CLIP's pad token is often its eos token).
        """
        if self.eos_token_id == 2:
            end = ids.argmax(dim=-1)
        else:
            end = (ids == self.eos_token_id).int().argmax(dim=-1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return positions[None, :] <= end[:, None]

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        mask = self.text_mask(text)
        out = self.model.text_model(input_ids=text, attention_mask=mask.long())
        pooled = out.pooler_output
        emb = self.model.text_projection(pooled)
        if not tokens:
            return Features(embedding=emb, pooled=pooled)
        return Features(embedding=emb, pooled=pooled, tokens=out.last_hidden_state, mask=mask)


class HFSiglipModel(_HFModel):
    """Wraps a transformers `SiglipModel` (`self.model`) and its tokenizer; a sigmoid model with a bias.

    embedding: the vision attention-pooling head's output (SigLIP has no projection after it, so
    `pooled` is the same tensor) and the text `head` of the last position's final-layer-normed state
    (`pooled` is that state, before the head). Image tokens: every patch token after `post_layernorm`.
    """

    def __init__(self, model, tokenizer, image_config: ImageConfig, *, name: str) -> None:
        text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
        eos = getattr(tokenizer, "eos_token_id", None)
        super().__init__(
            model,
            tokenizer,
            image_config,
            name=name,
            eos_token_id=text_cfg.eos_token_id if eos is None else eos,
        )
        if not getattr(vision_cfg, "vision_use_head", True):
            raise UserError(
                f"SiglipModel '{name}' has no vision pooling head (vision_use_head false), so no image "
                "embedding; pass a SiglipModel saved with its head"
            )
        self.embed_dim = int(vision_cfg.hidden_size)
        text_dim = int(getattr(text_cfg, "projection_size", None) or text_cfg.hidden_size)
        if text_dim != self.embed_dim:
            raise UserError(
                f"SiglipModel '{name}' embeds images in {self.embed_dim} and texts in {text_dim} dimensions; "
                "the two must match"
            )
        self.max_scale = math.inf  # SiglipModel.forward uses exp(logit_scale) as it is
        self.train(model.training)

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        out = self.model.vision_model(pixel_values=images)
        emb = out.pooler_output
        return Features(embedding=emb, pooled=emb, tokens=out.last_hidden_state if tokens else None)

    def text_mask(self, ids: Tensor) -> Tensor:
        """Real tokens: up to and including the first end-of-text token (every position when a row has none).

        The model itself attends to every position (no mask, as `SiglipModel.forward`); this mask only
        tells token-level terms which positions are text rather than padding.
        """
        is_eos = ids == self.eos_token_id
        end = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), ids.shape[1] - 1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return positions[None, :] <= end[:, None]

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        out = self.model.text_model(input_ids=text)
        pooled = out.last_hidden_state[:, -1]
        emb = out.pooler_output
        if not tokens:
            return Features(embedding=emb, pooled=pooled)
        return Features(embedding=emb, pooled=pooled, tokens=out.last_hidden_state, mask=self.text_mask(text))

    def logit_bias(self) -> Tensor:
        return self.model.logit_bias.reshape(())


def _kinds() -> dict[str, tuple]:
    """transformers `model_type` -> (model class, image processor class, adapter)."""
    from transformers import CLIPImageProcessor, CLIPModel, SiglipImageProcessor, SiglipModel

    return {
        "clip": (CLIPModel, CLIPImageProcessor, HFClipModel),
        "siglip": (SiglipModel, SiglipImageProcessor, HFSiglipModel),
    }


def from_spec(rest: str) -> _HFModel:
    """`hf:DIR` (a `save_pretrained` folder) or `hf:org/name` (hub id, needs a download)."""
    from transformers import AutoConfig, AutoTokenizer

    if not rest:
        raise UserError(
            "empty hf spec; write 'hf:/path/to/saved/model' (a CLIPModel or SiglipModel) or 'hf:org/name'"
        )
    local = Path(rest).expanduser()
    looks_local = rest.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise UserError(
            f"'{rest}' is not a saved CLIPModel or SiglipModel folder (no config.json); "
            "pass the folder given to save_pretrained"
        )
    source = str(local) if looks_local else rest
    where = "folder" if looks_local else "hub id (no internet here? pass a local folder)"
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the model config of {where} '{rest}' ({first_line(err)})") from err
    kinds = _kinds()
    if model_type not in kinds:
        raise UserError(
            f"'{rest}' holds a transformers '{model_type}' model; the hf: adapter reads "
            f"{' and '.join(repr(k) for k in kinds)} models (CLIPModel, SiglipModel)"
        )
    model_cls, processor_cls, adapter = kinds[model_type]
    try:
        model = model_cls.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load {model_cls.__name__} from {where} '{rest}' ({first_line(err)})"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(
            f"'{rest}' has no loadable tokenizer ({first_line(err)}); save one next to the model"
        ) from err
    try:
        processor = processor_cls.from_pretrained(source)
    except (OSError, ValueError):
        log.warning("%s has no preprocessor_config.json; using the default preprocessing", rest)
        processor = None
    size = int(model.config.vision_config.image_size)
    if processor is None and model_type == "siglip":  # SigLIP's own defaults (mean = std = 0.5), not CLIP's
        processor = processor_cls(size={"height": size, "width": size})
    config = image_config_from_processor(processor, size)
    return adapter(model.eval(), tokenizer, config, name=rest)
