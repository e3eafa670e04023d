"""Relational distillation over the batch and a memory bank of teacher embeddings (ours; docs/methods.md section 8).

For a query set and a candidate set each model gives a row distribution over the candidates; the
student matches the teacher's rows:

    L_r = mean_rows KL( softmax(S_t,r / tau_t,r) || softmax(S_s,r / tau_s,r) ),   teacher side detached
    L   = w_i2t L_i2t + w_t2i L_t2i + w_i2i L_i2i + w_t2t L_t2t

Relations (queries -> candidates): `i2t` images -> texts, `t2i` texts -> images (cross-modal, the
part that equals CLIP-KD's `crd`), `i2i`, `t2t` (intra-modal, the self-pair removed from both
softmaxes unless `keep_self`, CompRess's choice; SEED keeps it as a positive).

Similarities. Batch candidates: cosines inside each model's own space (no projector needed).
Bank candidates: FIFO queues of the M most recent teacher embeddings of the candidate modality; the
teacher's similarity is computed in teacher space, the student's as `normalize(P(s_q)) . b` with P
the Distiller's shared projector of the query modality (CompRess "1q" / SEED). With d_s == d_t there
is no shared projector: the term refuses unless `allow_shared_space: true` (the student lives in the
teacher's space) or `own_projector: true` (a private Linear d_s -> d_t initialised to the identity).

Temperatures. Cross-modal rows are scaled by each model's own logit scale (`s_t`, `s`) unless
`tau_cross_t` / `tau_cross_s` fix them; intra-modal rows use `tau_intra_t` = `tau_intra_s` = 0.04
(CompRess) because image-image cosines are far higher than image-text ones.

Bank. Gathered teacher embeddings (the Distiller passes full-batch outputs) are enqueued in
`update()`, after the loss, so the current batch is never its own candidate; the bank is a set of
registered buffers (saved in the Distiller's state_dict) and only its filled rows are candidates.
Because the teacher is frozen, a bank filled from a teacher cache is exact, not stale.

Unpaired images (a mixed batch, `data.unpaired`): caption-less images join as extra queries of the
image-query relations (`i2t` over the batch's texts and the text bank, `i2i` over the other unpaired
images and the image bank; `unpaired_loss`), and their teacher embeddings enter the image bank. Corpus
texts without images (`data.texts`) likewise: `t2i` rows over the batch's images and the image bank,
`t2t` among themselves and the text bank. Prior art:
CompRess (UMBCvision/CompRess), SEED (jacobswan1/SEED), ConaCLIP, CLIP-RD; see docs/methods.md section 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdistill.errors import UserError
from clipdistill.losses._functional import kl_rows
from clipdistill.losses.base import Outputs, Term, TermContext, register_term

RELATIONS: dict[str, tuple[str, str]] = {
    "i2t": ("image", "text"),
    "t2i": ("text", "image"),
    "i2i": ("image", "image"),
    "t2t": ("text", "text"),
}


class FifoBank(nn.Module):
    """A FIFO queue of the `size` most recent rows of width `dim`, as buffers (saved in state_dict).

    Rows are written at `ptr` and wrap around; `count` rows are valid. `valid()` returns the valid
    rows (storage order), `ordered()` the same rows oldest first.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer("entries", torch.zeros(self.size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, x: Tensor) -> None:
        x = x.detach()[-self.size :].to(self.entries.dtype)
        idx = (int(self.ptr) + torch.arange(x.shape[0], device=self.entries.device)) % self.size
        self.entries[idx] = x
        self.ptr.fill_((int(self.ptr) + x.shape[0]) % self.size)
        self.count.fill_(min(int(self.count) + x.shape[0], self.size))

    def valid(self) -> Tensor:
        return self.entries[: int(self.count)]

    def ordered(self) -> Tensor:
        if int(self.count) < self.size:
            return self.valid()
        p = int(self.ptr)
        return torch.cat([self.entries[p:], self.entries[:p]])


def _off_diagonal(x: Tensor) -> Tensor:
    n = x.shape[0]
    return x[~torch.eye(n, dtype=torch.bool, device=x.device)].view(n, n - 1)


def _parse_relations(value: object) -> list[str]:
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    for name in names:
        if name not in RELATIONS:
            raise UserError(
                f"losses.relational.relations: unknown relation '{name}'; known: {', '.join(RELATIONS)}"
            )
    if not names:
        raise UserError(f"losses.relational.relations is empty; choose from {', '.join(RELATIONS)}")
    return names


@register_term
class RelationalDistill(Term):
    """Our relational distillation (docs/methods.md section 8; formula and choices in the module docstring).

    Inputs: `student.image`, `student.text` (N x d_s, raw), `student.scale`; `teacher.image`,
    `teacher.text` (N x d_t), `teacher.scale`. Returns `relational` (the weighted sum) and each
    enabled relation unweighted as `relational/i2t` etc.
    Options: `relations` (list or comma string), `w_i2t`, `w_t2i`, `w_i2i`, `w_t2t`,
    `tau_intra_t`, `tau_intra_s`, `tau_cross_t`, `tau_cross_s` (None = the model's scale),
    `keep_self`, `bank_size` M (0 = batch only), `allow_shared_space`, `own_projector`.
    Invariant: a student equal to the teacher (same space, same scale, same temperatures) gives
    L = 0, the minimum of every KL.
    """

    name = "relational"
    needs = frozenset({"teacher", "teacher_text"})
    default_weight = 1.0
    source = "clipdistill (ours); docs/methods.md section 8"
    options = {
        "relations": ("i2t", "t2i", "i2i", "t2t"),
        "w_i2t": 1.0,
        "w_t2i": 1.0,
        "w_i2i": 0.5,
        "w_t2t": 0.5,
        "tau_intra_t": 0.04,
        "tau_intra_s": 0.04,
        "tau_cross_t": None,
        "tau_cross_s": None,
        "keep_self": False,
        "bank_size": 4096,
        "allow_shared_space": False,
        "own_projector": False,
    }

    def __init__(self, ctx: TermContext, **opts) -> None:
        super().__init__(ctx, **opts)
        self.relations = _parse_relations(self.opts["relations"])
        for key in ("tau_intra_t", "tau_intra_s", "tau_cross_t", "tau_cross_s"):
            if self.opts[key] is not None and not float(self.opts[key]) > 0:
                raise UserError(f"losses.relational.{key} = {self.opts[key]} must be > 0")
        for rel in self.relations:
            if float(self.opts[f"w_{rel}"]) < 0:
                raise UserError(f"losses.relational.w_{rel} = {self.opts[f'w_{rel}']} must be >= 0")
        bank_size = int(self.opts["bank_size"])
        if bank_size < 0:
            raise UserError(f"losses.relational.bank_size = {bank_size} must be >= 0 (0 disables the bank)")
        self.banks = nn.ModuleDict()
        self._proj: dict[str, nn.Module | None] = {}
        self.own = nn.ModuleDict()
        if bank_size == 0:
            return
        for rel in self.relations:
            query, cand = RELATIONS[rel]
            if cand not in self.banks:
                self.banks[cand] = FifoBank(bank_size, ctx.teacher_dim)
            if query not in self._proj:
                self._proj[query] = self._projector(ctx, query)

    def _projector(self, ctx: TermContext, modality: str) -> nn.Module | None:
        if self.opts["own_projector"]:
            proj = nn.Linear(ctx.student_dim, ctx.teacher_dim)
            if ctx.student_dim == ctx.teacher_dim:
                with torch.no_grad():
                    proj.weight.copy_(torch.eye(ctx.student_dim))
                    proj.bias.zero_()
            self.own[modality] = proj
            return proj
        proj = ctx.projector(modality)
        if proj is None and not self.opts["allow_shared_space"]:
            raise UserError(
                f"term 'relational': student and teacher widths are equal ({ctx.teacher_dim}), so no projector maps "
                "the student into the teacher's space for the memory bank; set losses.relational.own_projector: true, "
                "or allow_shared_space: true if the student shares the teacher's space, or bank_size: 0"
            )
        return proj

    def _temperatures(
        self, rel: str, student: Outputs, teacher: Outputs
    ) -> tuple[Tensor | float, Tensor | float]:
        """Multipliers (1 / tau) for the teacher and the student rows."""
        if RELATIONS[rel][0] == RELATIONS[rel][1]:
            return 1 / float(self.opts["tau_intra_t"]), 1 / float(self.opts["tau_intra_s"])
        tt, ts = self.opts["tau_cross_t"], self.opts["tau_cross_s"]
        return (teacher.scale.detach() if tt is None else 1 / float(tt)), (
            student.scale if ts is None else 1 / float(ts)
        )

    def relation(self, rel: str, student: Outputs, teacher: Outputs) -> Tensor:
        """L_r for one relation over the batch (and the bank when enabled)."""
        query, cand = RELATIONS[rel]
        sq_raw = getattr(student, query)
        sq, sc = F.normalize(sq_raw, dim=-1), F.normalize(getattr(student, cand), dim=-1)
        tq = F.normalize(getattr(teacher, query), dim=-1).detach()
        tc = F.normalize(getattr(teacher, cand), dim=-1).detach()
        s_rows, t_rows = sq @ sc.t(), tq @ tc.t()
        if query == cand and not self.opts["keep_self"]:
            s_rows, t_rows = _off_diagonal(s_rows), _off_diagonal(t_rows)
        if cand in self.banks and int(self.banks[cand].count) > 0:
            bank = self.banks[cand].valid().to(tq.dtype)
            proj = self._proj[query]
            sq_t = F.normalize(proj(sq_raw), dim=-1) if proj is not None else sq
            s_rows = torch.cat([s_rows, sq_t @ bank.t()], dim=1)
            t_rows = torch.cat([t_rows, tq @ bank.t()], dim=1)
        if s_rows.shape[1] == 0:  # one query, self removed, empty bank: nothing to match
            return s_rows.sum()
        mult_t, mult_s = self._temperatures(rel, student, teacher)
        return kl_rows(mult_t * t_rows, mult_s * s_rows)

    def forward(self, student: Outputs, teacher: Outputs | None) -> dict[str, Tensor]:
        logs: dict[str, Tensor] = {}
        total = 0.0
        for rel in self.relations:
            value = self.relation(rel, student, teacher)
            logs[f"{self.name}/{rel}"] = value
            total = total + float(self.opts[f"w_{rel}"]) * value
        return {self.name: total, **logs}

    def unpaired_loss(
        self, student_u: Outputs, teacher_u: Outputs | None, student: Outputs, teacher: Outputs | None
    ) -> dict[str, Tensor] | None:
        """Caption-less images as extra queries of the image-query relations: `i2t` rows over the
        batch's texts (and the text bank), `i2i` rows over the other unpaired images (self removed) and
        the image bank, weighted like their paired counterparts (DIME-FM's unpaired-image distributions).
        Corpus texts without images likewise: `t2i` rows over the batch's images, `t2t` among themselves."""
        logs: dict[str, Tensor] = {}
        total = 0.0
        modality = "image" if student_u.image is not None else "text"
        other = "text" if modality == "image" else "image"
        suffix = "unpaired" if modality == "image" else "texts"
        for rel in self.relations:
            query, cand = RELATIONS[rel]
            if query != modality:
                continue
            if cand != query:  # cross-modal rows over the batch's candidates of the other modality
                s_mix = student_u.replace(**{other: getattr(student, other)})
                t_mix = teacher_u.replace(**{other: getattr(teacher, other)})
                value = self.relation(rel, s_mix, t_mix)
            else:
                value = self.relation(rel, student_u, teacher_u)
            logs[f"{self.name}/{rel}_{suffix}"] = value
            total = total + float(self.opts[f"w_{rel}"]) * value
        if not logs:
            return None
        return {self.name: total, **logs}

    @torch.no_grad()
    def update(self, student: Outputs, teacher: Outputs | None) -> None:
        for modality, bank in self.banks.items():
            bank.enqueue(F.normalize(getattr(teacher, modality), dim=-1))

    @torch.no_grad()
    def update_unpaired(self, student_u: Outputs, teacher_u: Outputs | None) -> None:
        for modality, bank in self.banks.items():
            if getattr(teacher_u, modality) is not None:
                bank.enqueue(F.normalize(getattr(teacher_u, modality), dim=-1))

    def extra_repr(self) -> str:
        size = next(iter(self.banks.values())).size if self.banks else 0
        return f"relations={self.relations}, bank_size={size}, tau_intra={self.opts['tau_intra_t']}"
