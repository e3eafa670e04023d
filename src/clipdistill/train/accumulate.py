"""Gradient accumulation that stays exact for contrastive terms: GradCache (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"; code luyug/GradCache).

Plain accumulation sums the losses of k micro-batches, so each contrastive term only ever sees the
negatives of its own micro-batch: a different (easier) loss than the one on the full batch. GradCache
instead splits the backward pass at the embeddings:

1. embed every micro-batch without a graph (`torch.no_grad`), remembering the RNG state of each;
2. compute the full-batch loss on the concatenated embeddings (as leaves that require grad), and
   backpropagate it to those leaves (the Distiller's own parameters get their gradient here);
3. re-embed each micro-batch with a graph, replaying its RNG state (dropout, masking), and
   backpropagate the cached embedding gradients of its rows into the student.

The student's gradient is then exactly the full-batch one (tests/train/test_accumulate.py) for the
cost of a second forward pass. With k = 1 the forward runs once with its graph and steps 2-3 still
split at the embeddings, which is what lets the engine scale the per-row gradients for DDP
(`batch_grad_scale`, see engine.py) without touching the Distiller's gradients.

0-dim outputs (the logit scale) are shared by all micro-batches: their gradient is applied once, with
the last micro-batch, which is also the one whose backward synchronises DDP.

Caveat (as in GradCache): a student with batch-norm layers in training mode updates its running
statistics in both forward passes when k > 1, and normalises each micro-batch with its own statistics.
The ViT presets have no batch norm.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

Forward = Callable[[int], dict[str, Tensor]]
LossFn = Callable[[dict[str, Tensor]], tuple[Tensor, dict]]


def _rng_state(device: torch.device | None) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _Replay:
    """Re-run a forward with the RNG state it first ran with (GradCache's RandContext)."""

    def __init__(self, state: tuple, device: torch.device | None) -> None:
        self.state = state
        self.device = device
        self._fork: AbstractContextManager | None = None

    def __enter__(self) -> None:
        devices = [self.device] if self.state[1] is not None else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)


def _leaves(outs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        k: v.detach().float().requires_grad_(v.requires_grad or v.grad_fn is not None)
        for k, v in outs.items()
    }


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    out = {}
    for key, first in parts[0].items():
        out[key] = first if first.ndim == 0 else torch.cat([p[key] for p in parts], dim=0)
    return out


def _backward_into(
    outs: dict[str, Tensor], grads: dict[str, Tensor | None], batch_grad_scale: float, shared: bool
) -> None:
    tensors, seeds = [], []
    for key, value in outs.items():
        grad = grads.get(key)
        if grad is None or not value.requires_grad:
            continue
        if value.ndim == 0:
            if not shared:
                continue
            seeds.append(grad.to(value.dtype))
        else:
            seeds.append((grad * batch_grad_scale).to(value.dtype))
        tensors.append(value)
    if tensors:
        torch.autograd.backward(tensors, seeds)


def cached_backward(
    forward: Forward,
    n_micro: int,
    loss_fn: LossFn,
    *,
    batch_grad_scale: float = 1.0,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    check: Callable[[Tensor, dict], None] | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, dict, dict[str, Tensor]]:
    """One optimisation step's backward pass over `n_micro` micro-batches (see module docstring).

    forward(i): the student's outputs for micro-batch i (dict of tensors; batch tensors N_i x ...,
    0-dim tensors shared). loss_fn(full): (loss, logs) on the concatenated outputs. check(loss, logs)
    runs before any gradient is computed (e.g. to stop on a non-finite loss). batch_grad_scale
    multiplies the gradient of every batch tensor (the engine passes the world size to undo DDP's
    averaging of per-row gradients). no_sync(): a context that skips DDP's gradient all-reduce,
    used for every micro-batch but the last. Returns (loss, logs, detached full-batch outputs).
    """
    if n_micro == 1:
        outs = forward(0)
        leaves = _leaves(outs)
        loss, logs = loss_fn(leaves)
        if check is not None:
            check(loss, logs)
        loss.backward()
        _backward_into(outs, {k: v.grad for k, v in leaves.items()}, batch_grad_scale, shared=True)
        return loss.detach(), logs, {k: v.detach() for k, v in leaves.items()}

    states, parts = [], []
    with torch.no_grad():
        for i in range(n_micro):
            states.append(_rng_state(device))
            parts.append(forward(i))
    sizes = [{k: v.shape[0] for k, v in p.items() if v.ndim > 0} for p in parts]  # per key: mixed batches
    full = _concat(parts)
    leaves = {k: v.detach().float().requires_grad_(True) for k, v in full.items()}
    loss, logs = loss_fn(leaves)
    if check is not None:
        check(loss, logs)
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items()}
    start = dict.fromkeys(sizes[0], 0)
    for i in range(n_micro):
        stop = {k: start[k] + n for k, n in sizes[i].items()}
        last = i == n_micro - 1
        micro_grads = {
            k: (g if g is None or g.ndim == 0 else g[start[k] : stop[k]]) for k, g in grads.items()
        }
        # DDP decides in forward whether the following backward all-reduces: both go inside no_sync.
        with nullcontext() if last or no_sync is None else no_sync():
            with _Replay(states[i], device):
                outs = forward(i)
            _backward_into(outs, micro_grads, batch_grad_scale, shared=last)
        start = stop
    return loss.detach(), logs, {k: v.detach() for k, v in leaves.items()}
