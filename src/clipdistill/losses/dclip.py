"""DCLIP: the meta-teacher's cross-modal head and the student loss (docs/methods.md section 6).

Paper: Csizmadia et al., 2025, "Distill CLIP (DCLIP): Enhancing Image-Text Retrieval via
Cross-Modal Transformer Distillation"; code ChuckDanz/DCLIP (`training/patch_text_aggregation.py`
for the head, `training/CLIP_image_distillation.py` for the student loss).

Two stages. First a `DclipMetaHead` on top of the frozen teacher is trained with
`DclipMetaHead.contrastive_loss` (symmetric InfoNCE, tau = 0.05) and frozen; its enriched embeddings
`v*_t`, `t*_t` are cached as teacher extras (`Outputs.extra["image_enriched"]`, `["text_enriched"]`)
or computed online by the term from the teacher's tokens (option `head`: a file written by
`DclipMetaHead.save`). Then the `dclip` term distils them into the student.
Deviation (documented in docs/methods.md section 6): the paper's image tokens are CLIP embeddings of YOLO-detected
regions; offline we use the teacher's patch or region tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.losses._functional import contrastive_ce, gather, is_distributed
from clipdistill.losses.base import Outputs, Term, TermContext, register_term
from clipdistill.paths import atomic_path


def attention_pool(tokens: Tensor, mask: Tensor | None = None, temperature: float = 2.0) -> Tensor:
    """DCLIP's pooling: weights `softmax(cos(token, mean token) / temperature)` over the real tokens.

    tokens: N x L x d; mask: N x L bool (True = real token) or None. Returns N x d.
    """
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    m = mask.unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
    sim = F.cosine_similarity(tokens, mean.expand_as(tokens), dim=-1)
    weights = torch.softmax((sim / temperature).masked_fill(~mask, float("-inf")), dim=1)
    return (weights.unsqueeze(-1) * tokens).sum(1)


class DclipMetaHead(nn.Module):
    """DCLIP's cross-modal head on the frozen teacher (docs/methods.md section 6): enriched image and text embeddings.

    Text tokens attend to image tokens and image tokens to text tokens (`nn.MultiheadAttention`,
    8 heads), each with a residual connection and LayerNorm; each side's output tokens are pooled
    by `attention_pool` (temperature 2.0). Token widths other than `dim` get an input projection
    (our tokens are pre-projection features; the paper's are CLIP embeddings already of width `dim`).
    Padding text tokens (`text_mask` False) are ignored as keys and in the pooling.

    Shapes: image_tokens N x L_i x w_i, text_tokens N x L_t x w_t, text_mask N x L_t -> two N x dim.
    `faithful=True` reproduces the code's image target `0.5 (text_global + image_global)` (it averages
    both pooled sides into the image embedding); the clean form returns the image side's own pool.
    Other code details we do not reproduce: it attends over zero-padded tokens without a mask, and its
    text target is the caption's chunk aggregation, not the head's text output.
    """

    def __init__(
        self,
        dim: int,
        image_token_dim: int | None = None,
        text_token_dim: int | None = None,
        num_heads: int = 8,
        pool_temperature: float = 2.0,
        faithful: bool = False,
    ) -> None:
        super().__init__()
        self.config = {
            "dim": dim,
            "image_token_dim": image_token_dim,
            "text_token_dim": text_token_dim,
            "num_heads": num_heads,
            "pool_temperature": pool_temperature,
            "faithful": faithful,
        }
        self.image_in = (
            nn.Linear(image_token_dim, dim) if image_token_dim not in (None, dim) else nn.Identity()
        )
        self.text_in = nn.Linear(text_token_dim, dim) if text_token_dim not in (None, dim) else nn.Identity()
        self.text_to_image = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.image_to_text = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_text = nn.LayerNorm(dim)
        self.norm_image = nn.LayerNorm(dim)
        self.pool_temperature = pool_temperature
        self.faithful = faithful

    def forward(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        img = self.image_in(image_tokens)
        txt = self.text_in(text_tokens)
        mask = text_mask.bool() if text_mask is not None else None
        att_t, _ = self.text_to_image(txt, img, img, need_weights=False)
        txt_out = self.norm_text(txt + att_t)
        att_i, _ = self.image_to_text(
            img, txt, txt, key_padding_mask=None if mask is None else ~mask, need_weights=False
        )
        img_out = self.norm_image(img + att_i)
        text_global = attention_pool(txt_out, mask, self.pool_temperature)
        image_global = attention_pool(img_out, None, self.pool_temperature)
        if self.faithful:
            image_global = 0.5 * (text_global + image_global)
        return image_global, text_global

    @staticmethod
    def contrastive_loss(image_enriched: Tensor, text_enriched: Tensor, tau: float = 0.05) -> Tensor:
        """The head's training loss: symmetric InfoNCE with a fixed temperature (docs/methods.md section 6: tau = 0.05)."""
        logits = F.normalize(image_enriched, dim=-1) @ F.normalize(text_enriched, dim=-1).t() / tau
        return contrastive_ce(logits)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = atomic_path(path)
        torch.save({"config": self.config, "state_dict": self.state_dict()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> DclipMetaHead:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(
                f"DCLIP meta-teacher head '{path}' does not exist; train one and pass its file to losses.dclip.head"
            )
        blob = torch.load(path, map_location="cpu", weights_only=True)
        head = cls(**blob["config"])
        head.load_state_dict(blob["state_dict"])
        return head


def _full_batch(x: Tensor, n: int, what: str) -> Tensor:
    # Teacher extras may arrive per rank (Outputs.tensors() does not reach into `extra`).
    if x.shape[0] == n:
        return x
    if is_distributed() and x.shape[0] * dist.get_world_size() == n:
        return gather(x.detach())
    raise UserError(
        f"term 'dclip': teacher extra '{what}' has {x.shape[0]} rows for a batch of {n}; cache one row per sample"
    )


@register_term
class DclipDistill(Term):
    """DCLIP student loss (docs/methods.md section 6; code `training/CLIP_image_distillation.py`).

        L = w_image (1 - cos(P_v(v_s), v*_t)) + w_text (1 - cos(P_t(t_s), t*_t))
            + w_contrastive InfoNCE(v_s, t_s; tau = 0.05)

    cosines averaged over the batch; InfoNCE symmetric on the student's own normalised embeddings
    with a fixed temperature (not the learned scale); weights 1/1/1. P_v, P_t are the Distiller's
    shared projectors (identity when d_s == d_t; the paper's student is a copy of the teacher).
    Inputs: `student.image`, `student.text` (N x d_s); `teacher.extra["image_enriched"]`,
    `["text_enriched"]` (N x d_t), or with option `head` the teacher's `image_tokens`, `text_tokens`
    and `text_mask`, from which the frozen head computes them. `freeze_text: true` (the README's
    setting; the code trains the text tower) stops this term's gradient into the student text
    embedding; freezing the tower's weights is the engine's job.
    Invariant: the two cosine parts reach their minimum 0 when the student reproduces the enriched
    teacher; the InfoNCE part has no minimum at the teacher.
    """

    name = "dclip"
    needs = frozenset({"teacher"})
    default_weight = 1.0
    source = "DCLIP (Csizmadia et al., 2025), ChuckDanz/DCLIP; docs/methods.md section 6"
    options = {
        "tau": 0.05,
        "w_image": 1.0,
        "w_text": 1.0,
        "w_contrastive": 1.0,
        "freeze_text": False,
        "head": None,
    }

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        if float(self.opts["tau"]) <= 0:
            raise UserError(f"losses.dclip.tau = {self.opts['tau']} must be > 0")
        self._proj = {"image": ctx.projector("image"), "text": ctx.projector("text")}
        self.head: DclipMetaHead | None = None
        if self.opts["head"] is not None:
            self.head = DclipMetaHead.load(self.opts["head"]).requires_grad_(False).eval()
            if self.head.config["dim"] != ctx.teacher_dim:
                raise UserError(
                    f"DCLIP head '{self.opts['head']}' outputs width {self.head.config['dim']}, the teacher {ctx.teacher_dim}; "
                    "train the head on this teacher"
                )
            # Instance-level needs: the online head reads the teacher's tokens.
            self.needs = self.needs | {"teacher_image_tokens", "text_tokens"}

    def enriched(self, teacher: Outputs) -> tuple[Tensor, Tensor]:
        """(v*_t, t*_t), N x d_t, from the teacher's extras or the online head."""
        n = teacher.image.shape[0]
        img, txt = teacher.extra.get("image_enriched"), teacher.extra.get("text_enriched")
        if img is None or txt is None:
            if self.head is None:
                raise UserError(
                    "term 'dclip' needs the meta-teacher's enriched embeddings: cache them as teacher extras "
                    "'image_enriched' and 'text_enriched', or set losses.dclip.head to a trained DclipMetaHead file"
                )
            if teacher.image_tokens is None or teacher.text_tokens is None:
                raise UserError(
                    "term 'dclip' with a head needs the teacher's image and text tokens; run the teacher online with tokens"
                )
            with torch.no_grad():
                img, txt = self.head(teacher.image_tokens, teacher.text_tokens, teacher.text_mask)
        return _full_batch(img, n, "image_enriched").detach(), _full_batch(txt, n, "text_enriched").detach()

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        img_t, txt_t = self.enriched(teacher)
        v_s = student.image
        t_s = student.text.detach() if self.opts["freeze_text"] else student.text
        pv, pt = self._proj["image"], self._proj["text"]
        l_img = (1 - F.cosine_similarity(pv(v_s) if pv is not None else v_s, img_t, dim=-1)).mean()
        l_txt = (1 - F.cosine_similarity(pt(t_s) if pt is not None else t_s, txt_t, dim=-1)).mean()
        logits = F.normalize(v_s, dim=-1) @ F.normalize(t_s, dim=-1).t() / float(self.opts["tau"])
        l_con = contrastive_ce(logits)
        loss = (
            float(self.opts["w_image"]) * l_img
            + float(self.opts["w_text"]) * l_txt
            + float(self.opts["w_contrastive"]) * l_con
        )
        return {
            self.name: loss,
            f"{self.name}/image": l_img,
            f"{self.name}/text": l_txt,
            f"{self.name}/contrastive": l_con,
        }
