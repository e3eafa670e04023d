"""Small functions every loss term composes (the `timm/layers` of losses/).

Conventions (docs/methods.md section 0): rows are queries, columns candidates; `kl_rows` is batchmean KL;
teacher tensors passed in are treated as constants by the callers (detached).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` over ranks along dim 0; the local slice keeps its autograd graph.

    open_clip's `gather_with_grad=False, local_loss=False` semantics: all_gather (no grad), then
    the local tensor is put back in its slot, so each rank computes the full-batch loss and its
    gradient reaches only the local inputs. Identity on a single process.
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def labels_like(logits: Tensor) -> Tensor:
    return torch.arange(logits.shape[0], device=logits.device)


def contrastive_ce(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE `(CE(Z, I) + CE(Z^T, I)) / 2` for a square logit matrix."""
    y = labels_like(logits)
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2


def kl_rows(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Row-wise `KL(softmax(t/T) || softmax(s/T))`, averaged over rows (batchmean)."""
    p_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    q_log = F.log_softmax(student_logits / temperature, dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def soft_ce(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Row-wise soft cross-entropy `-sum softmax(t/T) log softmax(s/T)`, averaged over rows."""
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return -(p * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


def mixture_log_softmax(logits: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Row-wise `log( mean_k softmax(Z_k / T) )` of K logit matrices of one shape, by log-sum-exp (no
    underflow for peaked rows). For K = 1 it is exactly `log_softmax(Z_1 / T)`."""
    logs = torch.stack([F.log_softmax(z / temperature, dim=-1) for z in logits])
    return torch.logsumexp(logs, dim=0) - math.log(len(logits))


def mixture_kl_rows(
    teacher_logits: Sequence[Tensor], student_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """`KL(P || softmax(s/T))` with `P = mean_k softmax(t_k/T)` (rows), batchmean; `kl_rows` for K = 1."""
    p_log = mixture_log_softmax(teacher_logits, temperature)
    q_log = F.log_softmax(student_logits / temperature, dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def mixture_soft_ce(
    teacher_logits: Sequence[Tensor], student_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """`-sum P log softmax(s/T)` with `P = mean_k softmax(t_k/T)` (rows), averaged over rows; `soft_ce` for K = 1."""
    p = torch.stack([F.softmax(z / temperature, dim=-1) for z in teacher_logits]).mean(0)
    return -(p * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


def cosine_logits(a: Tensor, b: Tensor, scale: Tensor | float) -> Tensor:
    """`scale * normalize(a) @ normalize(b)^T`."""
    return scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


def project_normalize(proj: torch.nn.Module | None, x: Tensor) -> Tensor:
    """`normalize(P(x))`, or `normalize(x)` when there is no projector (widths already equal)."""
    return F.normalize(proj(x) if proj is not None else x, dim=-1)


def symmetric_kl(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(`kl_rows(Z_t, Z_s)`, `kl_rows(Z_t^T, Z_s^T)`): the image->text and text->image row KLs."""
    return (
        kl_rows(teacher_logits, student_logits, temperature),
        kl_rows(teacher_logits.t(), student_logits.t(), temperature),
    )
