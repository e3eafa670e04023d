"""The optimiser of a run: AdamW parameter groups (and the optim.groups overrides, checked when the config
is loaded), the warmup + cosine learning-rate schedule, and optimiser settings changed between a
checkpoint and its --resume."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from clipdistill.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from clipdistill.losses.config import LossConfig
    from clipdistill.train.config import OptimConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # open_clip's rule: no weight decay on gains, biases, norms and the logit scale.
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


STUDENT_GROUPS = ("student", "student_no_decay")
L0_GROUPS = ("l0_masks", "l0_lambdas")  # automatic inheritance: constant lr, no weight decay, no clipping
GROUP_SETTINGS = ("lr", "weight_decay")


def group_names(losses: LossConfig, *, masked: bool) -> list[str]:
    """Every optimiser group a run can have: the student's, its Distiller's (`LossConfig.group_names`) and,
    for a masked student (automatic inheritance, student.sparsity), the L0 masks' and lambdas'."""
    return [*STUDENT_GROUPS, *losses.group_names(), *(L0_GROUPS if masked else ())]


def check_groups(groups: object, known: list[str]) -> None:
    """Refuse an optim.groups (group name -> {lr, weight_decay}, numbers >= 0) naming a group not in `known`."""
    if not isinstance(groups, dict):
        raise UserError(f"optim.groups must map a group name to {{lr: .., weight_decay: ..}}, got {groups!r}")
    for name, settings in groups.items():
        if name not in known:
            raise UserError(
                f"unknown optimiser group '{name}' in optim.groups; {did_you_mean(str(name), known)}"
                f"this run's groups: {', '.join(known)}"
            )
        if not isinstance(settings, dict) or not settings:
            raise UserError(f"optim.groups.{name} must be a mapping with {' and/or '.join(GROUP_SETTINGS)}")
        bad = sorted(set(settings) - set(GROUP_SETTINGS))
        if bad:
            raise UserError(
                f"optim.groups.{name} has no setting '{bad[0]}'; valid: {', '.join(GROUP_SETTINGS)}"
            )
        for key, value in settings.items():
            _check_setting(f"optim.groups.{name}.{key}", value)


def _check_setting(what: str, value: object) -> None:
    # bool is an int subclass; PyYAML reads `1e-6` (no dot) as a string, which float() takes
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{what} = {value!r} is not a finite number; give a number >= 0")
    if number < 0:
        raise UserError(f"{what} = {number:g} is negative; give a number >= 0")


def param_groups(student: nn.Module, distiller: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: "student", "student_no_decay", the Distiller's groups and, for a masked student
    (automatic inheritance, student.sparsity), "l0_masks" and "l0_lambdas"; each at cfg.lr and
    cfg.weight_decay (the L0 groups at their own), with the cfg.groups overrides (checked at load)."""
    from clipdistill.models.pruning import masked_part

    masked = masked_part(student)
    l0 = masked.param_groups() if masked is not None else []
    skip = {id(p) for g in l0 for p in g["params"]}
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad and id(p) not in skip:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"name": "student", "params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "student_no_decay", "params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        *distiller.param_groups(cfg.lr, cfg.weight_decay),
        *l0,
    ]
    # a group without parameters in this run (e.g. no projector) has nothing to set
    return apply_group_overrides([g for g in groups if g["params"]], cfg.groups)


def apply_group_overrides(groups: list[dict], overrides: dict[str, dict] | None) -> list[dict]:
    """Set each named group's optim.groups overrides (lr, weight_decay; checked by `check_groups`) in
    place; returns `groups`."""
    for group in groups:
        group.update({k: float(v) for k, v in (overrides or {}).get(group.get("name"), {}).items()})
    return groups


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of every group's lr after `step` optimiser steps: linear warmup, then cosine (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(groups: list[dict], o: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, o: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine (or constant) over `total_steps` optimiser steps (`lr_factor`); the L0 masks and
    lambdas of automatic inheritance keep their lr (TinyCLIP's constant mask and Lagrangian rates)."""

    def schedule(s: int) -> float:
        return lr_factor(s, total_steps, o.warmup_steps, o.schedule, o.min_lr_ratio)

    def constant(s: int) -> float:
        return 1.0

    lambdas = [constant if g.get("name") in L0_GROUPS else schedule for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def apply_changed_optim(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    before: dict,
    now: dict,
    fresh: list[dict],
) -> list[str]:
    """Optimiser settings changed since the checkpoint (`before`, the checkpoint's optim config; `now`,
    the run's) take effect from the resumed step on: loading the optimiser and scheduler state would
    silently restore the old ones. `fresh`: the param groups' settings before the state was loaded.
    Returns the changed keys (none: nothing is touched)."""
    changed = [k for k in now if k != "accum_steps" and k in before and before[k] != now[k]]
    if not changed:
        return changed
    for group, new in zip(optimizer.param_groups, fresh):
        for key in ("initial_lr", "weight_decay", "betas", "eps"):
            if key in new:
                group[key] = new[key]
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changed
