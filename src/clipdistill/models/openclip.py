"""open_clip adapter: any open_clip architecture behind the `ClipModel` interface (issue "Foundation").

Specs (after the `openclip:` prefix):

    ViT-B-32                      architecture, random initialisation
    ViT-B-32/laion2b_s34b_b79k    architecture with a pretrained tag (needs a download)
    hf-hub:org/name               open_clip hub id (needs a download)
    ViT-B-32@/path/ckpt.pt        architecture with a local checkpoint file
    local-dir:/path  or  /path    a folder written by `clipdistill export --format openclip`

Preprocessing comes from the model's own `preprocess_cfg` (size, mean, std, interpolation), the
tokenizer from `open_clip.get_tokenizer`. Intermediate features follow open_clip's own forward
(`_embeds`, `transformer`, `_pool` of open_clip >= 3.0), so `embedding` is bit-identical to
`model.encode_image` and the patch tokens are those open_clip returns with `output_tokens=True`
(after `ln_post`).

SigLIP-style models (configs with `init_logit_bias`, e.g. `ViT-B-16-SigLIP`) carry a `logit_bias`
parameter; `logit_bias()` returns it and their scale is used unclamped, as open_clip's forward does
(docs/methods.md section 14). Softmax models keep the clamp at 100 and have no bias.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
from copy import deepcopy
from pathlib import Path

import torch
from torch import Tensor, nn

from clipdistill.errors import UserError, did_you_mean, unknown_name
from clipdistill.models.base import ClipModel, Features, ImageConfig
from clipdistill.models.factory import PATH_STARTS, parse_spec

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
PRUNED_KEY = "clipdistill_pruned"  # per-layer sizes of a pruned model (models/pruned.py)
# What loading a bad checkpoint file raises (torch.load, open_clip, load_state_dict).
LOAD_ERRORS = (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError)


def image_config_from_preprocess(cfg: dict) -> ImageConfig:
    """`ImageConfig` from an open_clip `preprocess_cfg` dict (eval transform: resize short side, centre crop)."""
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    interp = cfg.get("interpolation", "bicubic")
    if interp not in ("bicubic", "bilinear", "nearest"):
        interp = "bicubic"
    return ImageConfig(
        size=int(size),
        resize=int(size),
        mean=tuple(float(v) for v in cfg.get("mean", ImageConfig.mean)),
        std=tuple(float(v) for v in cfg.get("std", ImageConfig.std)),
        interpolation=interp,
    )


def first_line(err: BaseException) -> str:
    """The first line of an error message (its type name when empty), for one-line UserErrors."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _project(x: Tensor, proj: nn.Module | Tensor | None) -> Tensor:
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        return proj(x)
    return x @ proj


def trim_padding(text: Tensor, pad_id: int = 0) -> Tensor:
    """`text` without the columns after its last non-pad token (at least one column is kept)."""
    used = (text != pad_id).any(0).nonzero()
    return text[:, : int(used.max()) + 1] if len(used) else text[:, :1]


class OpenClipModel(ClipModel):
    """Wraps an open_clip `CLIP` / `CustomTextCLIP` (`self.model`), its tokenizer and model config."""

    def __init__(self, model: nn.Module, tokenizer, *, name: str, model_cfg: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.model_cfg = deepcopy(model_cfg) if model_cfg is not None else None
        from open_clip.model import get_model_preprocess_cfg

        self.image_config = image_config_from_preprocess(get_model_preprocess_cfg(model))
        self.embed_dim = self._infer_embed_dim()
        if self.logit_bias() is not None:
            self.max_scale = math.inf  # a sigmoid model's own forward does not clamp its scale
        self.train(model.training)  # the wrapper starts in the wrapped model's mode

    def _infer_embed_dim(self) -> int:
        if self.model_cfg and "embed_dim" in self.model_cfg:
            return int(self.model_cfg["embed_dim"])
        visual = self.model.visual
        if getattr(visual, "output_dim", None):
            return int(visual.output_dim)
        with torch.no_grad():
            size = self.image_config.size
            return int(self.model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.model.context_length)

    @property
    def preprocess_cfg(self) -> dict:
        from open_clip.model import get_model_preprocess_cfg

        return deepcopy(get_model_preprocess_cfg(self.model))

    def image_features(self, images: Tensor, *, tokens: bool = False) -> Features:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            x = visual.transformer(visual._embeds(images))
            pooled, tok = visual._pool(x)
            emb = _project(pooled, visual.proj)
        elif isinstance(visual, TimmModel):
            fmap = visual.trunk.forward_features(images)
            emb = visual.head(visual.trunk.forward_head(fmap))
            pooled = visual.trunk.forward_head(fmap, pre_logits=True)
            tok = fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap
        else:  # ModifiedResNet and others: only the embedding is exposed
            emb, pooled, tok = visual(images), None, None
        return Features(embedding=emb, pooled=pooled, tokens=tok if tokens else None)

    def text_features(self, text: Tensor, *, tokens: bool = False) -> Features:
        from open_clip.transformer import TextTransformer, text_global_pool

        m = self.model
        text_tower = getattr(m, "text", None)
        if isinstance(text_tower, TextTransformer):
            t = text_tower
            x, attn_mask = t._embeds(text)
            x = t.transformer(x, attn_mask=attn_mask)
            if t.cls_emb is not None:
                pooled, tok = t.ln_final(text_global_pool(x, pool_type="last")), x[:, :-1]
            else:
                tok = t.ln_final(x)
                pooled = text_global_pool(tok, text, pool_type=t.pool_type, eos_token_id=t.eos_id)
            emb, pad_id = _project(pooled, t.text_projection), t.pad_id
        elif text_tower is not None:  # e.g. an HF text tower: embedding only
            return Features(embedding=text_tower(text))
        else:
            cast, mask = m.transformer.get_cast_dtype(), m.attn_mask
            if (
                not tokens
                and mask is not None
                and m.text_pool_type in ("argmax", "eos")
                and not torch.jit.is_tracing()
            ):
                # causal attention pooled at the end token: the trailing padding changes nothing, so drop it
                # (never while tracing, e.g. ONNX export: a traced graph would keep the example's length)
                text = trim_padding(text)
                mask = mask[: text.shape[1], : text.shape[1]]
            x = m.token_embedding(text).to(cast) + m.positional_embedding[: text.shape[1]].to(cast)
            tok = m.ln_final(m.transformer(x, attn_mask=mask))
            pooled = text_global_pool(
                tok, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None)
            )
            emb, pad_id = _project(pooled, m.text_projection), 0
        if not tokens:
            return Features(embedding=emb, pooled=pooled)
        return Features(embedding=emb, pooled=pooled, tokens=tok, mask=text != pad_id)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(list(texts)).long()

    def raw_logit_scale(self) -> Tensor:
        return self.model.logit_scale.reshape(())

    def logit_bias(self) -> Tensor | None:
        """open_clip's `logit_bias` parameter (SigLIP-style models, built with `init_logit_bias`), else None."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else bias.reshape(())


def set_preprocess(model: nn.Module, overrides: dict | None = None) -> None:
    """Attach open_clip's default preprocess config (size from the image tower) updated by `overrides`."""
    from dataclasses import asdict

    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = asdict(PreprocessCfg())
    size = getattr(model.visual, "image_size", None)
    if size is not None:
        cfg["size"] = size
    set_model_preprocess_cfg(model, merge_preprocess_dict(cfg, overrides or {}))


def build_openclip(model_cfg: dict) -> nn.Module:
    """An open_clip model (random init) from a config dict, as open_clip's factory builds it."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = deepcopy(model_cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    model = (CustomTextCLIP if custom else CLIP)(**cfg)
    set_preprocess(model)
    return model


def from_config(model_cfg: dict, *, name: str = "custom") -> OpenClipModel:
    """An `OpenClipModel` (random init) from an open_clip config dict, with open_clip's default tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    context = model_cfg.get("text_cfg", {}).get("context_length", 77)
    return OpenClipModel(
        build_openclip(model_cfg).eval(),
        SimpleTokenizer(context_length=context),
        name=name,
        model_cfg=model_cfg,
    )


@contextlib.contextmanager
def quiet_open_clip():
    """Silence open_clip's root-logger chatter (every build logs several INFO lines and a random-init warning)."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(previous)


def _open_clip():
    import open_clip

    return open_clip


def _ensure_student_configs() -> None:
    from clipdistill.models.students import register_configs

    register_configs()


def _check_arch(arch: str) -> None:
    oc = _open_clip()
    _ensure_student_configs()
    if arch not in oc.list_models():
        known = sorted(oc.list_models())
        if len(known) <= 20:
            raise unknown_name("open_clip model", arch, known)
        raise UserError(
            f"unknown open_clip model '{arch}'; {did_you_mean(arch, known)}{len(known)} are known "
            "(python -c 'import open_clip; print(open_clip.list_models())')"
        )


def load_local_dir(path: str | Path) -> OpenClipModel:
    """A folder with `open_clip_config.json` and weights (what `export_openclip` writes), pruned models included."""
    with quiet_open_clip():
        return _load_local_dir(path)


def _load_local_dir(path: str | Path) -> OpenClipModel:
    oc = _open_clip()
    path = Path(path).expanduser()
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise UserError(
            f"'{path}' has no {CONFIG_FILE}; pass a folder written by `clipdistill export --format openclip`"
        )
    try:
        info = json.loads(cfg_file.read_text())
        model_cfg = info["model_cfg"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read '{cfg_file}' ({err}); re-export the model") from err
    try:
        if PRUNED_KEY in info:
            from clipdistill.models.pruned import build_pruned

            model = build_pruned(model_cfg, info[PRUNED_KEY])
            ckpt = oc.factory._find_checkpoint_in_dir(path)
            if ckpt is None:
                raise FileNotFoundError(f"no weights file in {path}")
            model.load_state_dict(oc.factory.load_state_dict(ckpt), strict=True)
            set_preprocess(model, info.get("preprocess_cfg", {}))
        else:
            model = oc.create_model(f"local-dir:{path}")
        tokenizer = oc.get_tokenizer(f"local-dir:{path}")
    except LOAD_ERRORS as err:
        raise UserError(f"cannot load open_clip folder '{path}' ({first_line(err)}); re-export it") from err
    return OpenClipModel(model.eval(), tokenizer, name=str(path), model_cfg=model_cfg)


def from_spec(rest: str) -> OpenClipModel:
    """Build from the part of an `openclip:` spec after the prefix (see module docstring)."""
    with quiet_open_clip():
        return _from_spec(rest)


def _from_spec(rest: str) -> OpenClipModel:
    oc = _open_clip()
    if not rest:
        raise UserError(
            "empty open_clip spec; write e.g. 'openclip:ViT-B-32' or 'openclip:ViT-B-32@/path/ckpt.pt'"
        )
    if rest.startswith("local-dir:"):
        return _load_local_dir(rest[len("local-dir:") :])
    if rest.startswith("hf-hub:"):
        try:
            model = oc.create_model(rest)
            tokenizer = oc.get_tokenizer(rest)
            cfg = oc.get_model_config(rest)
        except Exception as err:  # noqa: BLE001 - network and hub errors come in many types
            raise UserError(
                f"cannot load '{rest}' from the Hugging Face hub ({type(err).__name__}); without internet use "
                "a local checkpoint: 'openclip:ARCH@/path/ckpt.pt'"
            ) from err
        return OpenClipModel(model.eval(), tokenizer, name=rest, model_cfg=cfg)
    if Path(rest).expanduser().is_dir():
        return _load_local_dir(rest)
    spec = parse_spec(f"openclip:{rest}")
    arch, ckpt, tag = spec.name, spec.checkpoint, spec.tag
    if rest.startswith(PATH_STARTS) and ckpt is None:
        raise UserError(
            f"model folder '{rest}' not found; pass an existing folder written by `clipdistill export`, "
            "or openclip:ARCH[/TAG] or openclip:ARCH@/path/ckpt.pt"
        )
    _check_arch(arch)
    kwargs: dict = {"pretrained_text": False, "pretrained_image": False}
    if ckpt is not None:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint '{ckpt}' not found; pass an existing file as 'openclip:{arch}@FILE'")
        try:
            model = oc.create_model(arch, pretrained=str(path), **kwargs)
        except LOAD_ERRORS as err:
            raise UserError(
                f"cannot load checkpoint '{ckpt}' into {arch} ({first_line(err)}); check the file and architecture"
            ) from err
    elif tag is not None:
        tags = oc.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            raise unknown_name(f"pretrained tag for {arch}", tag, tags)
        try:
            model = oc.create_model(arch, pretrained=tag)
        except Exception as err:  # noqa: BLE001 - download errors come in many types
            raise UserError(
                f"cannot download weights '{arch}/{tag}' ({type(err).__name__}); without internet use "
                f"'openclip:{arch}@/path/ckpt.pt'"
            ) from err
    else:
        model = oc.create_model(arch, **kwargs)
    return OpenClipModel(model.eval(), oc.get_tokenizer(arch), name=rest, model_cfg=oc.get_model_config(arch))
