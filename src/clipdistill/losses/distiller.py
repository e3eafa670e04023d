"""The `Distiller`: builds the configured terms, owns their learnable parts, gathers once, sums.

It is an `nn.Module` trained, saved and synchronised under DDP together with the student: it owns
the shared projectors `P_image`, `P_text: Linear(d_s, d_t)` with bias (docs/methods.md section 0; created only
when a term asks for one and d_s != d_t) and, through its terms, every other learnable part (ICL and
AFD scales, AFD fusion layers, EduAttention, the cluster classifier) and state (memory banks).

Distributed semantics (docs/methods.md section 0; open_clip's `gather_with_grad=False, local_loss=False`): every
tensor of the student's and the teacher's `Outputs` is all-gathered once per step, the local slice
keeping its autograd graph, and every term runs on the full batch. The loss on each rank is then the
single-process loss on the concatenated batch, and the gradient reaching each rank's local inputs is
that loss's gradient for those rows (tests/losses/test_distributed.py). Note for the engine: under
DDP's gradient averaging this gives the student's encoder 1/world_size of the full-batch gradient,
while parameters applied after the gather (the Distiller's, the student's logit scale) get the full
one, exactly as in open_clip. Every rank must pass the same local batch size.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.losses._functional import gather, is_distributed
from clipdistill.losses.base import DEFAULT_GROUP, NEEDS, Outputs, Term, TermContext, get_term
from clipdistill.losses.config import LossConfig

log = logging.getLogger(__name__)

TEACHER_MODES = ("online", "cached", "none")
# Needs that no run without a teacher can meet.
TEACHER_NEEDS = frozenset(
    {
        "teacher",
        "teacher_text",
        "teacher_online",
        "teacher_pooled",
        "image_tokens",
        "teacher_image_tokens",
        "text_tokens",
    }
)


def _gather_tensor(x: Tensor, grad: bool) -> Tensor:
    x = x if grad else x.detach()
    if x.dtype == torch.bool:  # not every backend all-gathers bool
        return gather(x.to(torch.uint8)).bool()
    return gather(x)


def gather_outputs(out: Outputs, *, grad: bool) -> Outputs:
    """`out` with every batch tensor gathered over ranks (`_functional.gather`); 0-dim tensors (scales) stay.

    grad=False detaches everything (the teacher). Tensors in `out.extra` whose first dimension is the
    local batch size are gathered too, and so are an ensemble teacher's `members`. On one process: `out`
    itself (detached when grad=False).
    """
    if not is_distributed():
        return out if grad else out.detach()
    n = (out.image if out.image is not None else out.text).shape[0]
    changes = {name: _gather_tensor(x, grad) for name, x in out.tensors().items() if x.ndim > 0}
    if not grad:
        changes["scale"] = out.scale.detach()
    extra = {
        k: _gather_tensor(v, grad) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v
        for k, v in out.extra.items()
    }
    members = tuple(gather_outputs(m, grad=grad) for m in out.members)
    return out.replace(**changes, extra=extra, members=members)


def _overrides_update(term: Term) -> bool:
    return type(term).update is not Term.update or type(term).update_unpaired is not Term.update_unpaired


def _uses_unpaired(term: Term) -> bool:
    return (
        term.unpaired != "none"
        or type(term).unpaired_loss is not Term.unpaired_loss
        or type(term).update_unpaired is not Term.update_unpaired
    )


class Distiller(nn.Module):
    """All configured loss terms, their learnable parts and their weighted sum (calling convention: losses/base.py).

    cfg: a parsed `LossConfig`. student_dim, teacher_dim: embedding widths d_s, d_t; the pooled
    widths are passed to terms that read pre-projection features. Terms run in config order and
    share one `TermContext` (terms that share a module rely on it, e.g. ComKD's EduAttention).
    """

    def __init__(
        self,
        cfg: LossConfig,
        student_dim: int,
        teacher_dim: int,
        *,
        student_pooled_dim: int | None = None,
        teacher_pooled_dim: int | None = None,
        unpaired_weight: float = 1.0,
        text_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not unpaired_weight >= 0:
            raise UserError(f"data.unpaired_weight = {unpaired_weight} must be >= 0")
        if not text_weight >= 0:
            raise UserError(f"data.text_weight = {text_weight} must be >= 0")
        self.unpaired_weight, self.text_weight = float(unpaired_weight), float(text_weight)
        if not cfg.weights:
            raise UserError("losses: names no term; add at least one, e.g. losses: {clip: 1.0}")
        self.cfg = cfg
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.weights = dict(cfg.weights)
        self.projectors = nn.ModuleDict()
        self._own_count = 0
        ctx = TermContext(
            self.student_dim, self.teacher_dim, self._projector, student_pooled_dim, teacher_pooled_dim
        )
        self.terms = nn.ModuleDict(
            {name: get_term(name)(ctx, **cfg.options.get(name, {})) for name in cfg.weights}
        )
        log.debug("distiller: %s; projectors: %s", self.weights, list(self.projectors))

    def _projector(self, modality: str, own: bool = False) -> nn.Module | None:
        """TermContext.projector: the shared (or, with own=True, a private) Linear d_s -> d_t."""
        if modality not in ("image", "text"):
            raise ValueError(f"projector modality must be 'image' or 'text', not {modality!r}")
        if self.student_dim == self.teacher_dim:
            return None
        key = modality
        if own:
            self._own_count += 1
            key = f"{modality}_own{self._own_count}"
        if key not in self.projectors:
            self.projectors[key] = nn.Linear(self.student_dim, self.teacher_dim)
        return self.projectors[key]

    @property
    def needs(self) -> set[str]:
        """The union of the configured terms' needs (instance-level: a term may add needs from its options)."""
        return set().union(*(term.needs for term in self.terms.values()))

    @property
    def uses_unpaired(self) -> bool:
        """Whether some term may read the unpaired part of a mixed batch (`Term.unpaired`, or its own
        `unpaired_loss` or `update_unpaired`); when none does, that part changes neither the loss nor any state."""
        return any(_uses_unpaired(term) for term in self.terms.values())

    def check(self, teacher_mode: str, available: set[str]) -> None:
        """Refuse a run whose teacher mode and `available` needs do not meet every term's needs.

        teacher_mode: "online", "cached" or "none". "teacher" is implied by a teacher and
        "teacher_online" by an online one; without a teacher no teacher-side need can be met.
        """
        if teacher_mode not in TEACHER_MODES:
            raise UserError(f"unknown teacher mode '{teacher_mode}'; known: {', '.join(TEACHER_MODES)}")
        have = set(available)
        if teacher_mode == "none":
            have -= TEACHER_NEEDS
        else:
            have.add("teacher")
        if teacher_mode == "online":
            have.add("teacher_online")
        else:
            have.discard("teacher_online")
        for name, term in self.terms.items():
            missing = sorted(set(term.needs) - have)
            if missing:
                what = "; ".join(f"'{m}' ({NEEDS.get(m, m)})" for m in missing)
                raise UserError(
                    f"term '{name}' needs {what}, which this run (teacher mode '{teacher_mode}') does not provide; "
                    f"provide it or remove losses.{name}"
                )

    def forward(
        self,
        student: Outputs,
        teacher: Outputs | None,
        unpaired: tuple[Outputs, Outputs | None] | None = None,
        texts: tuple[Outputs, Outputs | None] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total, logs). Logs hold every term's entries detached and "loss" (the total).

        student, teacher: local-batch `Outputs`; gathered over ranks once here. A zero-weight term is
        evaluated without gradient, for its logs only. `unpaired`: (student, teacher) image-only
        `Outputs` of the caption-less images of a mixed batch; each term that uses them
        (`Term.unpaired_loss`) adds `unpaired_weight` x its value there, logged as `<term>/unpaired`.
        `texts`: the same for corpus texts without images (text-only `Outputs`): `text_weight` x the
        value, logged as `<term>/texts`.
        """
        s = gather_outputs(student, grad=True)
        t = gather_outputs(teacher, grad=False) if teacher is not None else None
        extra_parts = []  # (log suffix, weight, student, teacher)
        for suffix, weight_u, part in (
            ("unpaired", self.unpaired_weight, unpaired),
            ("texts", self.text_weight, texts),
        ):
            if part is not None:
                extra_parts.append(
                    (
                        suffix,
                        weight_u,
                        gather_outputs(part[0], grad=True),
                        gather_outputs(part[1], grad=False) if part[1] is not None else None,
                    )
                )
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            if t is None and term.needs & TEACHER_NEEDS:
                raise UserError(
                    f"term '{name}' needs a teacher but none was given; run with a teacher or remove losses.{name}"
                )
            weight = self.weights[name]
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                out = term(s, t)
                if name not in out:
                    raise RuntimeError(f"term '{name}' returned {sorted(out)} without its own entry '{name}'")
                value = out[name]
                used = False
                for suffix, weight_u, su, tu in extra_parts:
                    out_u = term.unpaired_loss(su, tu, s, t)
                    if out_u is None:
                        continue
                    used = True
                    value = value + weight_u * out_u[name]
                    logs[f"{name}/{suffix}"] = torch.as_tensor(out_u[name]).detach()
                    logs.update({k: torch.as_tensor(v).detach() for k, v in out_u.items() if k != name})
            if weight > 0:
                total = weight * value if total is None else total + weight * value
            logs.update({k: torch.as_tensor(v).detach() for k, v in out.items()})
            if used:
                logs[name] = torch.as_tensor(value).detach()
        if total is None:  # every weight is 0: a zero that still connects to the graph
            total = (s.image if s.image is not None else s.text).sum() * 0.0
        logs["loss"] = total.detach()
        return total, logs

    @torch.no_grad()
    def update(
        self,
        student: Outputs,
        teacher: Outputs | None,
        unpaired: tuple[Outputs, Outputs | None] | None = None,
        texts: tuple[Outputs, Outputs | None] | None = None,
    ) -> None:
        """After the optimiser step: lets terms update their state (memory banks, step counters)."""
        terms = [term for term in self.terms.values() if _overrides_update(term)]
        if not terms:
            return
        s = gather_outputs(student, grad=False)
        t = gather_outputs(teacher, grad=False) if teacher is not None else None
        for term in terms:
            term.update(s, t)
        for part in (unpaired, texts):
            if part is None:
                continue
            su = gather_outputs(part[0], grad=False)
            tu = gather_outputs(part[1], grad=False) if part[1] is not None else None
            for term in terms:
                term.update_unpaired(su, tu)

    def group_names(self) -> list[str]:
        """Every parameter-group name this Distiller can produce (some may be empty): `LossConfig.group_names`."""
        names = self.cfg.group_names()
        return names + [
            g for g in dict.fromkeys(t.param_group() for t in self.terms.values()) if g not in names
        ]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The Distiller's trainable parameters as optimiser groups ("params", "lr", "weight_decay", "name").

        Shared projectors go to "distiller"; a term's own parameters to `term.param_group()`; each
        parameter once, every group at `lr` and `weight_decay` (a run's optim.groups overrides them per
        group: train/optim.py). Empty groups are left out.
        """
        params: dict[str, list[nn.Parameter]] = {name: [] for name in self.group_names()}
        seen: set[int] = set()

        def add(group: str, module: nn.Module) -> None:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params[group].append(p)

        add(DEFAULT_GROUP, self.projectors)
        for term in self.terms.values():
            add(term.param_group(), term)
        groups = []
        for name, ps in params.items():
            if ps:
                groups.append(
                    {"name": name, "params": ps, "lr": float(lr), "weight_decay": float(weight_decay)}
                )
        return groups

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={w:g}" for name, w in self.weights.items())
