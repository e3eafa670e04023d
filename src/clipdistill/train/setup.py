"""A run's setup before step 0 (issue 7): the teacher, the Distiller, the checks of the teacher caches
against the run, the student's forward module and the eval datasets. Every refusal happens here,
before any training step."""

from __future__ import annotations

import logging

import torch

from clipdistill.data.teacher_cache import TeacherCache, teacher_parts
from clipdistill.errors import UserError
from clipdistill.losses.distiller import Distiller
from clipdistill.models.base import ClipModel
from clipdistill.train import build
from clipdistill.train.config import TrainConfig
from clipdistill.train.streams import DataStream

log = logging.getLogger("clipdistill.train.engine")  # the run's messages, under one name


def check_eval_datasets(cfg: TrainConfig) -> None:
    """Resolve every eval.datasets entry (dataset, split) now, not after training."""
    from clipdistill.data.shards import dataset_info
    from clipdistill.train.evaluate import parse_dataset

    for spec in cfg.eval.datasets:
        name, split = parse_dataset(spec)
        try:
            dataset_info(name, cfg.data.root).shards(split)
        except UserError as err:
            raise UserError(f"eval.datasets entry '{spec}': {err}") from None
    for name, every in cfg.eval.subsample.items():
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(
                f"eval.subsample.{name} = {every!r} must be a whole number >= 1 (every n-th sample)"
            )


def build_teacher(
    cfg: TrainConfig, mode: str, cache: TeacherCache | None, device: torch.device
) -> ClipModel | None:
    """The frozen teacher (None without teacher.spec); a list of member specs builds an ensemble."""
    from clipdistill.models.ensemble import member_model, members_of
    from clipdistill.models.factory import create_model

    spec = cfg.teacher.model_spec
    teacher = create_model(spec).to(device).eval() if spec else None
    if teacher is not None:
        teacher.requires_grad_(False)
        for model in members_of(teacher):
            if mode == "online" and cache is None and getattr(model, "feature_cache", None) is not None:
                model.feature_cache = None  # fresh random views never repeat: storing them only costs disk
        member_model(teacher, cfg.teacher.member)  # teacher.member in range
    return teacher


def check_ensemble(cfg: TrainConfig, cache: TeacherCache | None) -> None:
    """teacher.member against a cache's members (the check that matters without teacher.spec), and a
    warning where `kd` meets an ensemble teacher: it distils the chosen member only."""
    if cache is not None:
        count = len(cache.info.members or [None])
        if cfg.teacher.member >= count:
            raise UserError(
                f"teacher.member = {cfg.teacher.member} but the teacher cache '{cache.root}' holds {count} "
                f"member(s); pick 0..{count - 1}"
            )
    ensemble = bool(cache.info.members) if cache is not None else (cfg.teacher.members or 0) > 1
    terms = cfg.losses.weights
    if ensemble and "kd" in terms and "ensemble_kd" not in terms:
        log.warning(
            "term 'kd' distils member %d of the ensemble teacher only; use 'ensemble_kd' for the mean of the "
            "members' distributions (MobileCLIP, docs/methods.md section 7.1)",
            cfg.teacher.member,
        )


def teacher_width(cache: TeacherCache | None, teacher: ClipModel | None, member: int = 0) -> int | None:
    """The width of the teacher embeddings the terms see (from the cache, else the teacher): an ensemble's
    chosen member's; None without a teacher."""
    if cache is not None:
        start, end = cache.info.member_columns()[member if cache.info.members else 0]
        return end - start
    if teacher is None:
        return None
    from clipdistill.models.ensemble import member_model

    return member_model(teacher, member).embed_dim


def build_distiller(
    cfg: TrainConfig,
    student: ClipModel,
    teacher: ClipModel | None,
    cache: TeacherCache | None,
    mode: str,
    teacher_dim: int | None,
    device: torch.device,
) -> Distiller:
    """The Distiller of `cfg.losses`, sized for the student's and the teacher's (pooled) widths."""
    from clipdistill.losses.base import get_term
    from clipdistill.models.ensemble import member_model

    needs = set().union(*(get_term(n).needs for n in cfg.losses.weights))
    s_pooled = build.pooled_width(student, device) if "student_pooled" in needs else None
    if "teacher_pooled" in needs and mode == "cached":
        start, end = cache.info.member_columns("pooled_dim")[cfg.teacher.member if cache.info.members else 0]
        t_pooled = (end - start) or None
    elif "teacher_pooled" in needs:
        t_pooled = build.pooled_width(member_model(teacher, cfg.teacher.member), device)
    else:
        t_pooled = None
    return Distiller(
        cfg.losses,
        student.embed_dim,
        teacher_dim or student.embed_dim,
        student_pooled_dim=s_pooled,
        teacher_pooled_dim=t_pooled,
        unpaired_weight=cfg.data.unpaired_weight,
        text_weight=cfg.data.text_weight,
    ).to(device)


def available(
    student: ClipModel, mode: str, cache: TeacherCache | None, *, text: bool, own_text: bool
) -> set[str]:
    """What the run can give the loss terms (`Distiller.check`)."""
    have = {"cluster_centres", "student_pooled"}
    if text:
        have.add("teacher_text")
        if own_text:
            have.add("student_text")
    if mode == "online":
        have |= {"teacher_pooled", "image_tokens", "teacher_image_tokens", "text_tokens"}
    elif cache is not None and cache.info.pooled_dim:
        have.add("teacher_pooled")
    if build.vision_transformer(student) is not None:
        have.add("masked_view")
    return have


def check_caches(
    cfg: TrainConfig,
    streams: list[DataStream],
    teacher: ClipModel | None,
    distiller: Distiller,
    mode: str,
    text: bool,
) -> dict[str, str] | None:
    """Refuse teacher caches that do not match the run (shards, teacher, augmentations, what they hold);
    returns the per-caption cache extras the paired stream reads (dclip's enriched embeddings) or None."""
    needs = distiller.needs
    paired = streams[0]
    unpaired = next((s for s in streams if s.kind == "unpaired"), None)
    has_cache = paired.cache is not None or (unpaired is not None and unpaired.cache is not None)
    parts = teacher_parts(teacher) if teacher is not None and has_cache else None  # a weights hash: once
    if paired.cache is not None:
        paired.cache.check(
            shards=paired.shards,
            teacher=parts,
            policy=cfg.data.augment,
            pooled="teacher_pooled" in needs and mode == "cached",
            text=text,
        )
    extras = None
    dclip = distiller.terms["dclip"] if "dclip" in distiller.terms else None
    if dclip is not None and mode == "cached" and dclip.head is None:
        from clipdistill.models.dclip_teacher import EXTRAS, has_dclip_extras

        if not has_dclip_extras(paired.cache):
            raise UserError(
                f"term 'dclip' trains from a teacher cache only with the meta-teacher's enriched embeddings; build them with "
                f"`clipdistill cache-teacher --teacher SPEC --data ... --augmentations 1 --dclip --out {paired.cache.root}`, "
                "or run the teacher online with losses.dclip.head"
            )
        extras = dict(EXTRAS)
    if unpaired is not None and unpaired.cache is not None:
        cache, cache_u = paired.cache, unpaired.cache
        cache_u.check(
            shards=unpaired.shards, teacher=parts, policy=cfg.data.augment, pooled="teacher_pooled" in needs
        )
        if cache is not None and cache_u.info.parts.get("weights") != cache.info.parts.get("weights"):
            raise UserError(
                f"teacher.unpaired_cache '{cache_u.root}' and teacher.cache '{cache.root}' were "
                "built from different teachers; build both with the same --teacher"
            )
    return extras


def student_forward(student: ClipModel, distiller: Distiller, *, own_text: bool) -> build.StudentForward:
    """The module DDP/FSDP wraps: every student tensor the Distiller's terms need, in one forward."""
    needs = distiller.needs
    mfd = distiller.terms["mfd"] if "mfd" in distiller.terms else None
    return build.StudentForward(
        student,
        own_text=own_text,
        pooled="student_pooled" in needs,
        tokens="image_tokens" in needs,
        mask_ratio=float(mfd.opts["mask_ratio"]) if mfd is not None else None,
    )
