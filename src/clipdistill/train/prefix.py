"""Train an image student's trainable suffix on stored activations of its frozen prefix.

With `student.freeze: N` the first N trunk blocks of a pretrained image tower never change
(`models.freeze`), so their output is a fixed function of the image, like the teacher's frozen towers.
`collect` runs every image once through the student's frozen prefix (and the teacher, whose tower
features come from its feature cache) and keeps the activations; `train_suffix` then trains the
suffix, head and logit scale with any recipe of registered loss terms (the `Distiller`) from those
activations, on one process. One step costs the suffix alone: on this 2-core CPU that is 5-20x
cheaper than running the whole tower, which is what makes an hour-long budget reach tens of epochs.

Views: one centre view per image (the student's own preprocessing) and, with `flip=True`, its mirror
image, which gets the teacher's embedding of the mirrored image as its target. With `crops=K`, K more
views per image: random resized crops (area `crop_scale` of the image, aspect 3/4-4/3, mirrored with
probability 1/2, as torchvision's RandomResizedCrop + RandomHorizontalFlip), each with the teacher's
embedding of the same crop as its target. Crops are drawn from the sample key, so a set collected twice
gets the same views. Views stored apart (e.g. crops collected later) join with `join_views`. Caption-less images
(e.g. CIFAR-10 train, used unlabeled) enter as the unpaired part of a mixed batch (`Term.unpaired_loss`).
"""

from __future__ import annotations

import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from clipdistill.data.shards import Sample, batched
from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.losses.config import LossConfig, parse_loss_config
from clipdistill.losses.distiller import Distiller
from clipdistill.models.base import ClipModel
from clipdistill.train.optim import apply_group_overrides, check_groups

log = logging.getLogger(__name__)


@dataclass
class Activations:
    """One set of images: the frozen prefix's output per view and the teacher's embeddings.

    prefix: V x N x C x H x W (fp16; view 0 is the centre crop, view 1 its mirror image, then random
    crops; a crops-only collection holds random crops alone).
    teacher_image: V x N x d teacher image embeddings of the same views.
    text, text_owner: T x d teacher embeddings of every caption and the image index of each (None for
    caption-less images). labels: N class labels where the set has them (evaluation only).
    """

    prefix: Tensor
    teacher_image: Tensor
    text: Tensor | None = None
    text_owner: Tensor | None = None
    keys: list[str] = field(default_factory=list)
    labels: Tensor | None = None

    def __len__(self) -> int:
        return self.prefix.shape[1]

    def subset(self, rows: Tensor | Sequence[int]) -> Activations:
        """The images `rows` (indices, or an N-long bool mask), in that order, with their captions (kept
        image by image, owners renumbered), keys and labels."""
        idx = torch.as_tensor(rows)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long().flatten()
        if len(idx.unique()) != len(idx):
            raise UserError("Activations.subset: rows repeat an image; give each row once")
        text = owner = None
        if self.text is not None:
            new = torch.full((len(self),), -1, dtype=torch.long)
            new[idx] = torch.arange(len(idx))
            owners = new[self.text_owner]
            kept = (owners >= 0).nonzero().flatten()
            kept = kept[torch.argsort(owners[kept], stable=True)]  # image by image in the new order
            text, owner = self.text[kept], owners[kept]
        return Activations(
            self.prefix[:, idx],
            self.teacher_image[:, idx],
            text,
            owner,
            [self.keys[i] for i in idx.tolist()] if self.keys else [],
            self.labels[idx] if self.labels is not None else None,
        )


def random_crop(image: Image.Image, key: str, view: int, scale: tuple[float, float]) -> Image.Image:
    """A random resized crop of `image` (area fraction in `scale`, aspect ratio 3/4-4/3, log-uniform, as
    torchvision's RandomResizedCrop), mirrored with probability 1/2; drawn from (key, view), so it is
    the same crop on every run. Falls back to the whole image when no box fits in 10 tries."""
    rng = random.Random(zlib.crc32(f"{key}/{view}".encode()))
    w, h = image.size
    box = (0, 0, w, h)
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = (x, y, x + cw, y + ch)
            break
    crop = image.crop(box)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def join_views(*sets: Activations) -> Activations:
    """One set from collections of the same images with different views (views concatenated)."""
    first = sets[0]
    for other in sets[1:]:
        if other.keys != first.keys:
            raise UserError("join_views: the collections hold different images; collect them from one split")
    return Activations(
        torch.cat([s.prefix for s in sets]),
        torch.cat([s.teacher_image for s in sets]),
        first.text,
        first.text_owner,
        first.keys,
        first.labels,
    )


def _teacher_embed(teacher: ClipModel, images: list) -> Tensor:
    x = torch.stack([teacher.preprocess(im) for im in images])
    return teacher.image_features(x).embedding.float()


@torch.no_grad()
def collect(
    prefixes: dict[object, tuple[nn.Module, ClipModel]],
    teacher: ClipModel,
    samples: Iterable[Sample],
    *,
    captions: bool,
    flip: bool = True,
    crops: int = 0,
    crop_scale: tuple[float, float] = (0.4, 1.0),
    centre: bool = True,
    batch_size: int = 64,
    desc: str = "collect",
) -> dict[object, Activations]:
    """Activations of every prefix in `prefixes` ({key: (prefix module, model whose preprocessing feeds
    it)}) on `samples`, decoding each image once; the teacher embeds the same views (and, with
    `captions`, every caption). Views: the centre view and its mirror (`centre`, `flip`), then `crops`
    random resized crops (`random_crop`); `centre=False` collects the crops alone."""
    if not centre and not crops:
        raise UserError("collect: no views (centre=False and crops=0); ask for the centre view or crops")
    outs: dict[object, list[list[Tensor]]] = {k: [] for k in prefixes}
    t_img: list[list[Tensor]] = []
    texts: list[Tensor] = []
    owners: list[int] = []
    keys: list[str] = []
    labels: list[int] = []
    for batch in tqdm(batched(samples, batch_size), desc=desc, unit="batch", leave=False):
        images = [s.image.convert("RGB") for s in batch]
        views = [images] if centre else []
        if centre and flip:
            views.append([im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images])
        for c in range(crops):
            views.append([random_crop(im, s.key, c, crop_scale) for im, s in zip(images, batch)])
        for key, (module, model) in prefixes.items():
            outs[key].append(
                [
                    module(
                        torch.stack([model.preprocess(im) for im in v]).to(memory_format=torch.channels_last)
                    )
                    .half()
                    .contiguous()
                    for v in views
                ]
            )
        t_img.append([_teacher_embed(teacher, v) for v in views])
        if captions:
            caps = [c for s in batch for c in (s.captions or [])]
            owners.extend(len(keys) + i for i, s in enumerate(batch) for _ in (s.captions or []))
            texts.append(teacher.text_features(teacher.tokenize(caps).to(teacher.device)).embedding.float())
        keys.extend(s.key for s in batch)
        labels.extend(s.label for s in batch if s.label is not None)
    if not keys:
        raise UserError(f"{desc}: no samples; check the dataset and split")
    if captions and len(set(owners)) != len(keys):
        raise UserError(f"{desc}: some images have no caption; pass caption-less sets as unpaired images")
    teacher_image = torch.stack([torch.cat(parts) for parts in zip(*t_img)])
    text = torch.cat(texts) if captions else None
    owner = torch.tensor(owners) if captions else None
    label_t = torch.tensor(labels) if len(labels) == len(keys) else None
    return {
        key: Activations(
            torch.stack([torch.cat(parts) for parts in zip(*chunks)]),
            teacher_image,
            text,
            owner,
            keys,
            label_t,
        )
        for key, chunks in outs.items()
    }


HEAD_INITS = ("ridge", "caption", "random")


@dataclass
class SuffixTrainConfig:
    """The recipe and budget of `train_suffix`. `losses` may be given as a recipe's `losses:` mapping; it is
    parsed (and checked) once, here, into a `LossConfig`."""

    losses: LossConfig = field(default_factory=lambda: parse_loss_config({"clip": 1.0, "fd": 2000.0}))
    epochs: float = 10.0  # over the paired set
    batch_size: int = 256
    unpaired_batch_size: int = 256
    lr: float = 3e-4  # the new parts: linear head, logit scale, the Distiller's
    trunk_lr: float = (
        1e-4  # pretrained trunk blocks: lower, so fine-tuning does not wash out ImageNet features
    )
    # "ridge": fit the linear head in closed form to the teacher's image embeddings before any step (linear
    # probing, then fine-tuning: the random head otherwise spends the budget undoing its own noise);
    # "caption": the same fit to each image's captions (the mean of their text embeddings), for runs that
    # must not see the teacher's image tower (a no-teacher baseline); "random": the head as built.
    head_init: str = "ridge"
    # Batch-norm layers keep their pretrained running statistics (eval mode) while their weights train, so
    # training and evaluation see the same function and the ridge head stays fitted to it; in train mode
    # the batch statistics of these few datasets shift every feature away from what the head was fit to.
    frozen_bn: bool = True
    ridge: float = 1e-3  # ridge penalty, relative to the mean eigenvalue of the features' Gram matrix
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    max_minutes: float | None = None  # stop early (cosine schedule cut) when the wall-clock budget runs out
    # A recipe's optim.groups: {Distiller group: {lr, weight_decay}}, e.g. {"cluster_classifier": {"lr": 1e-6}};
    # absolute lrs, scaled by the warmup/cosine factor like every group's.
    groups: dict[str, dict[str, float]] | None = None
    curve_every: int = 0  # call train_suffix's on_step every this many steps (0: at the last step only)

    def __post_init__(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise UserError(f"head_init = {self.head_init!r}: choose one of {', '.join(HEAD_INITS)}")
        if not isinstance(self.losses, LossConfig):
            self.losses = parse_loss_config(self.losses)
        if self.groups:
            check_groups(self.groups, self.losses.group_names())
        if self.curve_every < 0:
            raise UserError(f"curve_every = {self.curve_every} must be >= 0")


class SuffixStudent(nn.Module):
    """The trainable part: suffix modules plus the student's logit scale (CLIP's 1/0.07 at start)."""

    def __init__(self, suffix: nn.Module) -> None:
        super().__init__()
        self.suffix = suffix.to(memory_format=torch.channels_last)  # 1.5-2x faster depthwise convs on CPU
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x: Tensor) -> Tensor:
        return self.suffix(x.float().to(memory_format=torch.channels_last))


def caption_targets(acts: Activations) -> Tensor:
    """N x d: each image's captions, as the normalised mean of their normalised text embeddings."""
    text = F.normalize(acts.text.float(), dim=-1)
    sums = torch.zeros(len(acts), text.shape[1]).index_add_(0, acts.text_owner.long(), text)
    if (sums.norm(dim=-1) == 0).any():
        raise UserError("head_init 'caption': an image of the paired set has no caption")
    return F.normalize(sums, dim=-1)


@torch.no_grad()
def fit_head(
    suffix: nn.Module,
    sets: list[Activations],
    ridge: float = 1e-3,
    batch_size: int = 512,
    target: str = "teacher_image",
) -> float:
    """Set `suffix.head` (a Linear, or a Sequential ending in one) to the ridge-regression solution from the
    pooled features of every view in `sets` to the teacher's normalised image embeddings (`target`
    "teacher_image"), or to each image's caption target (`target` "caption", `caption_targets`; sets without
    captions are skipped); returns the mean cosine between the fitted embeddings and the targets."""
    if target not in ("teacher_image", "caption"):
        raise UserError(f"fit_head target {target!r}: choose teacher_image or caption")
    if target == "caption":
        sets = [acts for acts in sets if acts.text is not None]
        if not sets:
            raise UserError("head_init 'caption' needs a set with captions (the paired set has none)")
    head = suffix.head
    linear = (
        head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    )
    was = suffix.training
    suffix.eval()
    original, suffix.head = suffix.head, nn.Identity()
    feats, targets = [], []
    for acts in sets:
        captions = caption_targets(acts).double() if target == "caption" else None  # the same for every view
        for v in range(acts.prefix.shape[0]):
            x = acts.prefix[v]
            feats.append(
                torch.cat(
                    [
                        suffix(x[i : i + batch_size].float().to(memory_format=torch.channels_last))
                        for i in range(0, x.shape[0], batch_size)
                    ]
                ).double()
            )
            targets.append(
                captions if captions is not None else F.normalize(acts.teacher_image[v].double(), dim=-1)
            )
    suffix.head = original
    suffix.train(was)
    x, y = torch.cat(feats), torch.cat(targets)
    mean = x.mean(0)
    xc, yc = x - mean, y - y.mean(0)
    gram = xc.T @ xc
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xc.T @ yc)  # features x d
    b = y.mean(0) - mean @ w
    linear.weight.copy_(w.T.float())
    if linear.bias is None:  # no bias to hold the offset: refit through the origin
        w = torch.linalg.solve(
            x.T @ x + ridge * (x.T @ x).diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y
        )
        b = torch.zeros_like(b)
        linear.weight.copy_(w.T.float())
    else:
        linear.bias.copy_(b.float())
    return float(F.cosine_similarity(x @ w + b, y).mean())


def _rows(n: int, size: int, gen: torch.Generator) -> Iterable[Tensor]:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield perm[i : i + size]


def check_recipe(distiller: Distiller) -> None:
    """Refuse terms that stored activations cannot serve: they hold the cached teacher's image and text
    embeddings alone (no student text tower, masked view, tokens, pooled features or teacher extras)."""
    distiller.check("cached", {"teacher_text", "cluster_centres"})
    if "dclip" in distiller.terms and distiller.terms["dclip"].head is None:
        raise UserError(
            "term 'dclip' needs the meta-teacher's enriched embeddings (teacher extras), which stored "
            "activations do not hold; remove losses.dclip"
        )


def suffix_param_groups(
    model: SuffixStudent, distiller: Distiller, params: list[nn.Parameter], cfg: SuffixTrainConfig
) -> list[dict]:
    """AdamW groups of `params` (the model's trainable parameters, then the Distiller's): the linear head and
    logit scale ("head") at cfg.lr, the trunk blocks ("trunk") at cfg.trunk_lr, weight decay only on
    parameters of 2 or more dims ("<name>_no_decay": none). The Distiller's parameters join "head"; with
    cfg.groups they keep their own groups (`Distiller.param_groups`) with the overrides applied."""
    head = {id(p) for p in getattr(model.suffix, "head", nn.Identity()).parameters()}
    head.add(id(model.logit_scale))
    named = []
    if cfg.groups:
        named = apply_group_overrides(distiller.param_groups(cfg.lr, cfg.weight_decay), cfg.groups)
        mine = {id(p) for p in model.parameters()}
        params = [p for p in params if id(p) in mine]
    else:
        head |= {id(p) for p in distiller.parameters()}
    parts = [
        ("head", cfg.lr, cfg.weight_decay, [p for p in params if id(p) in head]),
        ("trunk", cfg.trunk_lr, cfg.weight_decay, [p for p in params if id(p) not in head]),
        *((g["name"], g["lr"], g["weight_decay"], g["params"]) for g in named),
    ]
    groups = []
    for name, lr, decay, members in parts:
        groups += [
            {
                "name": name,
                "params": [p for p in members if p.ndim >= 2],
                "weight_decay": decay,
                "base_lr": lr,
            },
            {
                "name": f"{name}_no_decay",
                "params": [p for p in members if p.ndim < 2],
                "weight_decay": 0.0,
                "base_lr": lr,
            },
        ]
    return [g for g in groups if g["params"]]


def _call_hook(on_step: Callable[[int, nn.Module], None], step: int, suffix: nn.Module) -> float:
    """Run the progress hook without letting it change training: the modules' train/eval modes (e.g. the
    frozen batch norms, which `embed` would switch back to train) and the global RNG are restored.
    Returns the seconds it took."""
    began = time.time()
    modes = [(m, m.training) for m in suffix.modules()]
    rng = torch.get_rng_state()
    on_step(step, suffix)
    torch.set_rng_state(rng)
    for m, mode in modes:
        m.training = mode
    return time.time() - began


def planned_steps(cfg: SuffixTrainConfig, n: int) -> int:
    """The optimiser steps `train_suffix` plans for `n` paired images: `cfg.epochs` passes at its batch size
    (0: the ridge head alone, a linear probe)."""
    return int(cfg.epochs * n / min(cfg.batch_size, n))


def train_suffix(
    suffix: nn.Module,
    paired: Activations,
    unpaired: Activations | None,
    cfg: SuffixTrainConfig,
    teacher_scale: float,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    """Train `suffix` (in place) from stored activations; returns {"steps", "seconds", "final": logs}.

    on_step(step, suffix), e.g. to record a learning curve, with `step` the optimiser steps taken: at 0 (after
    the head's fit) and every `cfg.curve_every` steps when that is > 0, and after the last step taken. Its
    time counts toward neither `cfg.max_minutes` nor "seconds".
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dim = paired.teacher_image.shape[-1]
    distiller = Distiller(cfg.losses, dim, dim)
    check_recipe(distiller)
    model = SuffixStudent(suffix).train()
    fit_cos = None
    if cfg.head_init != "random":
        target = "caption" if cfg.head_init == "caption" else "teacher_image"
        sets = [paired] + ([unpaired] if unpaired is not None else [])
        fit_cos = fit_head(suffix, sets, cfg.ridge, target=target)
    if cfg.frozen_bn:
        for m in suffix.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    params = [p for p in model.parameters() if p.requires_grad] + list(distiller.parameters())
    groups = suffix_param_groups(model, distiller, params, cfg)
    optim = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    # Without a term that reads them, the unpaired images' forward is wasted, unless it moves the running
    # statistics of batch norms in train mode; their rows are still drawn so the paired batches stay the same
    # (a suffix with active dropout then draws its masks from the global generator in another order).
    forward_u = distiller.uses_unpaired or any(
        m.training for m in suffix.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    n = len(paired)
    batch = min(cfg.batch_size, n)
    total = planned_steps(cfg, n)
    views = paired.prefix.shape[0]
    rows = _rows(n, batch, gen)
    rows_u = (
        _rows(len(unpaired), min(cfg.unpaired_batch_size, len(unpaired)), gen)
        if unpaired is not None
        else None
    )
    if paired.text is None:
        raise UserError("the paired set has no captions; the task loss needs image-caption pairs")
    counts = torch.bincount(paired.text_owner, minlength=n)
    starts = torch.cumsum(counts, 0) - counts  # captions are stored image by image
    scale_t = torch.tensor(float(teacher_scale))
    start = time.time()
    logs: dict = {}
    done = 0
    called = None  # the last step on_step was called at
    if on_step is not None and cfg.curve_every > 0:
        start += _call_hook(on_step, 0, suffix)
        called = 0
    bar = tqdm(range(total), desc="train suffix", unit="step", leave=False)
    for step in bar:
        if cfg.max_minutes is not None and time.time() - start > 60 * cfg.max_minutes:
            log.info(
                "suffix training stopped at step %d of %d: %.0f min budget", step, total, cfg.max_minutes
            )
            break
        factor = (
            (step + 1) / cfg.warmup_steps
            if step < cfg.warmup_steps
            else 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))
        )
        for g in optim.param_groups:
            g["lr"] = g["base_lr"] * factor
        idx = next(rows)
        view = torch.randint(views, (len(idx),), generator=gen)
        pick = (torch.rand(len(idx), generator=gen) * counts[idx]).long()  # one random caption per image
        t_text = paired.text[starts[idx] + pick]
        scale = model.logit_scale.exp().clamp(max=100)
        student = Outputs(image=model(paired.prefix[view, idx]), text=t_text, scale=scale)
        teacher = Outputs(image=paired.teacher_image[view, idx], text=t_text, scale=scale_t)
        extra = None
        if rows_u is not None:
            iu = next(rows_u)
            vu = torch.randint(unpaired.prefix.shape[0], (len(iu),), generator=gen)
            if forward_u:
                extra = (
                    Outputs(image=model(unpaired.prefix[vu, iu]), text=None, scale=scale),
                    Outputs(image=unpaired.teacher_image[vu, iu], text=None, scale=scale_t),
                )
        loss, logs = distiller(student, teacher, unpaired=extra)
        if not torch.isfinite(loss):
            raise UserError(f"loss is {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        distiller.update(student.detach(), teacher, extra and tuple(o.detach() for o in extra))
        done = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None and cfg.curve_every > 0 and done % cfg.curve_every == 0:
            start += _call_hook(on_step, done, suffix)
            called = done
    if on_step is not None and called != done:
        start += _call_hook(on_step, done, suffix)
    model.eval()
    return {
        "steps": done,
        "planned_steps": total,
        "ridge_head_cosine": fit_cos,
        "seconds": round(time.time() - start, 1),
        "final": {k: round(float(v), 5) for k, v in logs.items()},
        "logit_scale": float(model.logit_scale.detach().exp()),
    }


@torch.no_grad()
def embed(suffix: nn.Module, acts: Tensor, batch_size: int = 512) -> Tensor:
    """Embeddings of stored prefix activations (N x C x H x W) through the suffix, in eval mode."""
    was = suffix.training
    suffix.eval()
    out = torch.cat(
        [
            suffix(acts[i : i + batch_size].float().to(memory_format=torch.channels_last))
            for i in range(0, acts.shape[0], batch_size)
        ]
    )
    suffix.train(was)
    return F.normalize(out, dim=-1)
