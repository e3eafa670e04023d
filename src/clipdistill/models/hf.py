"""Hugging Face transformers `CLIPModel` adapter (issue "Foundation"): `hf:/local/dir` or `hf:org/name`.

The folder (or hub repo) holds what `save_pretrained` writes: the model, its tokenizer and, when present,
`preprocessor_config.json` (`CLIPImageProcessor`), from which the evaluation preprocessing is taken.

Features: `pooled` is the vision `pooler_output` (class token after `post_layernorm`) and the text
`pooler_output` (the end-of-text token after `final_layer_norm`), both before the projection; image
patch tokens also go through `post_layernorm`, matching open_clip's `ln_post` on tokens.
"""

from __future__ import annotations

import logging
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


class HFClipModel(ClipModel):
    """Wraps a transformers `CLIPModel` (`self.model`) and its tokenizer."""

    def __init__(self, model, tokenizer, image_config: ImageConfig, *, name: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.image_config = image_config
        self.embed_dim = int(model.config.projection_dim)
        text_cfg = model.config.text_config
        self.context_length = int(text_cfg.max_position_embeddings)
        self.eos_token_id = int(text_cfg.eos_token_id)
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


def from_spec(rest: str) -> HFClipModel:
    """`hf:DIR` (a `save_pretrained` folder) or `hf:org/name` (hub id, needs a download)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    if not rest:
        raise UserError("empty hf spec; write 'hf:/path/to/saved/CLIPModel' or 'hf:org/name'")
    local = Path(rest).expanduser()
    looks_local = rest.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise UserError(
            f"'{rest}' is not a saved CLIPModel folder (no config.json); pass the folder given to save_pretrained"
        )
    source = str(local) if looks_local else rest
    try:
        model = CLIPModel.from_pretrained(source)
    except (OSError, ValueError) as err:
        where = "folder" if looks_local else "hub id (no internet here? pass a local folder)"
        raise UserError(f"cannot load CLIPModel from {where} '{rest}' ({first_line(err)})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(
            f"'{rest}' has no loadable tokenizer ({first_line(err)}); save one next to the model"
        ) from err
    try:
        processor = CLIPImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        log.warning("%s has no preprocessor_config.json; using CLIP's default preprocessing", rest)
        processor = None
    config = image_config_from_processor(processor, int(model.config.vision_config.image_size))
    return HFClipModel(model.eval(), tokenizer, config, name=rest)
