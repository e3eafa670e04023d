"""Pieces of one optimisation step (engine.py's `Run.train_step`): the teacher's side of a step (cached or
online, docs/methods.md section 7), the step's corpus texts (data.texts), the Distiller's arguments from
the student's tensors, and the stops on a non-finite loss or gradient."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipdistill.data.teacher_cache import CacheInfo
from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.models.base import ClipModel
from clipdistill.train import build
from clipdistill.train.streams import DataStream


class NonFiniteLoss(UserError):
    """The loss (or gradient) became NaN or inf: the run stops, its last checkpoint is kept."""


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TeacherSide:
    """The teacher's outputs of a step: read from the cache with the batch, or computed here by the online
    teacher (no grad); `mode` "none" has no teacher."""

    mode: str  # "cached", "online" or "none"
    model: ClipModel | None
    scale: float | None  # the cache's logit scale (cached mode)
    needs: set[str]  # the Distiller's needs
    device: torch.device
    precision: str
    # Ensemble teachers (docs/methods.md section 7.1): the member the terms other than ensemble_kd see,
    # and the cache's layout (its `CacheInfo`; cached mode), which splits stored rows into members.
    member: int = 0
    layout: CacheInfo | None = None

    @property
    def members(self) -> list[ClipModel] | None:
        from clipdistill.models.ensemble import EnsembleModel

        return list(self.model.members) if isinstance(self.model, EnsembleModel) else None

    def outputs(self, micro: list[dict], *, unpaired: bool = False) -> Outputs | None:
        """The teacher's outputs of `micro`, joined along the batch (`unpaired`: images without captions)."""
        if self.mode == "none":
            return None
        parts = []
        members = self.members
        for b in micro:
            if self.mode == "cached" and self.layout is not None and self.layout.members:
                parts.append(build.cached_ensemble_outputs(b, self.layout, self.member, self.device))
            elif self.mode == "cached":
                parts.append(build.cached_teacher_outputs(b, self.scale, self.device))
            else:
                captions = None if unpaired else b["captions"]
                wanted = {
                    "pooled": "teacher_pooled" in self.needs,
                    "image_tokens": not unpaired
                    and bool(self.needs & {"image_tokens", "teacher_image_tokens"}),
                    "text_tokens": not unpaired and "text_tokens" in self.needs,
                }
                with autocast(self.precision, self.device):
                    if members is None:
                        x = b["views"]["teacher"].to(self.device)
                        parts.append(build.online_teacher_outputs(self.model, x, captions, **wanted))
                    else:
                        views = [b["views"][f"teacher/{k}"].to(self.device) for k in range(len(members))]
                        parts.append(
                            build.online_ensemble_outputs(members, views, captions, self.member, **wanted)
                        )
        return build.concat_outputs(parts)

    @torch.no_grad()
    def texts(self, corpus: list[list[str]], teacher: Outputs | None) -> Outputs:
        """The teacher's text embeddings of the corpus texts (its text tower online, also in cached mode)."""
        texts = [t for part in corpus for t in part]
        members = self.members
        model = members[self.member] if members else self.model  # an ensemble: the chosen member
        with autocast(self.precision, self.device):
            emb = model.text_features(model.tokenize(texts).to(self.device)).embedding.float()
        if members:  # an ensemble's member embeddings are normalised ones
            emb = torch.nn.functional.normalize(emb, dim=-1)
        scale = teacher.scale if teacher is not None else model.logit_scale().detach().float()
        return Outputs(image=None, text=emb, scale=scale)


def corpus_texts(
    texts: DataStream | None, seed: int, step: int, rank: int, n_micro: int
) -> list[list[str]] | None:
    """This step's corpus texts per micro-batch: a pure function of (seed, step, rank, micro); None without data.texts."""
    if texts is None or not texts.corpus:
        return None
    from clipdistill.data.texts import sample_texts

    return [sample_texts(texts.corpus, texts.micro, seed, step, rank, i) for i in range(n_micro)]


def split_rows(out: dict, keys: tuple[str, ...], n: int, prefix: str) -> None:
    """Move rows n: of each of `keys` in `out` to `prefix + key` (the unpaired part of a joint forward)."""
    for key in [k for k in keys if k in out]:
        out[f"{prefix}{key}"], out[key] = out[key][n:], out[key][:n]


def distiller_args(
    s: dict[str, torch.Tensor],
    teacher: Outputs | None,
    *,
    own_text: bool,
    unpaired: tuple[Outputs | None] | None,
    texts: tuple[Outputs | None] | None,
) -> tuple:
    """The Distiller's (student, teacher, unpaired, texts) from the full-batch student tensors `s`
    (`split_rows` put the unpaired rows under "u_" and the corpus texts under "t_"). `unpaired` and
    `texts`: (teacher outputs,) of those parts, None where the step has none."""
    text = s.get("text", teacher.text if teacher is not None and not own_text else None)
    student = Outputs(
        image=s["image"],
        text=text,
        scale=s["scale"],
        image_pooled=s.get("image_pooled"),
        text_pooled=s.get("text_pooled"),
        image_tokens=s.get("image_tokens"),
        image_masked=s.get("image_masked"),
    )
    pair_u = pair_t = None
    if unpaired is not None:
        pair_u = (
            Outputs(
                image=s["u_image"],
                text=None,
                scale=s["scale"],
                image_pooled=s.get("u_image_pooled"),
                image_masked=s.get("u_image_masked"),
            ),
            unpaired[0],
        )
    if texts is not None:
        pair_t = (Outputs(image=None, text=s["t_text"], scale=s["scale"]), texts[0])
    # The step's loss inputs, detached (no copy: the same storage), for `nonfinite_grads` to re-run the
    # step's loss term by term on the same batch; the next step's call replaces them.
    _last_step.update(
        s={k: v.detach() for k, v in s.items()},
        teacher=teacher,
        own_text=own_text,
        unpaired=unpaired,
        texts=texts,
    )
    return student, teacher, pair_u, pair_t


_last_step: dict = {}


def last_good(out: Path, step: int | None) -> str:
    """Where a run stopped by a non-finite value can go on from (its last checkpoint's `step`), and the advice."""
    if step:
        return (
            f"the last good checkpoint (step {step}) is kept in {out / 'checkpoints'}; lower optim.lr "
            "(--resume applies it) or check the data"
        )
    return "no checkpoint was written yet; lower optim.lr or check the data, and start the run again"


def check_finite(loss: torch.Tensor, logs: dict, step: int, advice: Callable[[], str]) -> None:
    """Stop on a non-finite loss before any gradient, naming the term and the step (`step` optimiser
    steps done); `advice()` says where to go on from."""
    if torch.isfinite(loss):
        return
    bad = next(
        (k for k, v in logs.items() if k != "loss" and "/" not in k and not torch.isfinite(v).all()), None
    )
    bad = bad or next((k for k, v in logs.items() if k != "loss" and not torch.isfinite(v).all()), "loss")
    raise NonFiniteLoss(
        f"loss is {loss.item()} at step {step + 1} (term '{bad}' = {logs[bad].item()}); {advice()}"
    )


def nonfinite_grads(student: nn.Module, distiller: nn.Module) -> str:
    """Which loss term's (or the student's) parameters hold non-finite gradients, for the message.

    When no term's own parameters do, the step's loss is re-run term by term on the same batch (the
    inputs `distiller_args` last saw) and the terms whose gradient with respect to the student's
    outputs is non-finite are named.
    """
    names = [(f"student.{n}", p) for n, p in student.named_parameters()]
    names += [(f"distiller.{n}", p) for n, p in distiller.named_parameters()]
    bad = [n for n, p in names if p.grad is not None and not torch.isfinite(p.grad).all()]
    terms = sorted({n.split(".")[2] for n in bad if n.startswith("distiller.terms.")})
    if terms:
        return f"in the parameters of term {', '.join(repr(t) for t in terms)}"
    terms = _terms_with_nonfinite_grads(distiller)
    if terms:
        where = f" (first in {bad[0]})" if bad else ""
        return (
            f"from term {', '.join(repr(t) for t in terms)}{where}: the step re-run term by term on the same "
            "batch gives that term a non-finite gradient"
        )
    if bad:
        return f"in {bad[0]} ({len(bad)} parameter tensor(s) in all)"
    return "in no single parameter (the norm itself overflowed)"


def _terms_with_nonfinite_grads(distiller: nn.Module) -> list[str]:
    """The weighted terms whose loss on the last step's batch has a non-finite gradient with respect to
    the student's outputs (each term alone: the other weights set to 0 for the re-run)."""
    weights = getattr(distiller, "weights", None)
    if not _last_step or not isinstance(weights, dict):
        return []
    step = _last_step
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in step["s"].items()}
    args = distiller_args(
        leaves, step["teacher"], own_text=step["own_text"], unpaired=step["unpaired"], texts=step["texts"]
    )
    inputs = [v for v in leaves.values() if v.requires_grad]
    found = []
    saved = dict(weights)
    try:
        for name, weight in saved.items():
            if weight <= 0:
                continue
            weights.update({k: (w if k == name else 0.0) for k, w in saved.items()})
            try:
                with torch.enable_grad():
                    loss, _ = distiller(*args)
                    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            except Exception:  # noqa: BLE001 - a diagnosis only: the message falls back to the parameters
                continue
            if not torch.isfinite(loss) or any(g is not None and not torch.isfinite(g).all() for g in grads):
                found.append(name)
    finally:
        weights.update(saved)
        _last_step.clear()
    return found
