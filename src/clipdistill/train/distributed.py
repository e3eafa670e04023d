"""torchrun / DDP plumbing (issue 7): process group, device, model wrapping, rank-0-only output.

`clipdistill distill` under `torchrun --nproc_per_node N` reads RANK, WORLD_SIZE and LOCAL_RANK from
the environment and initialises the process group: NCCL on GPU, gloo on CPU. Without torchrun it is a
single process and every helper here is a no-op. The student is wrapped in DDP (or FSDP behind
`distributed.fsdp`); only rank 0 logs at INFO, writes checkpoints, TensorBoard and summaries.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from clipdistill.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device '{requested}' asked for but CUDA is not available; set device=cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    backend: str | None = None, device: str | None = None, timeout_s: int = 1800
) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(device=dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if rank != 0:
        logging.getLogger("clipdistill").setLevel(logging.WARNING)
    log.info("distributed: %d processes, backend %s, device %s", world, backend, dev)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev, backend=backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, info: DistInfo, *, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2 `fully_shard`) around `module` when distributed; `module` itself on one process.

    FSDP shards every open_clip residual block, then the rest, over all ranks (FSDP2 runs on CPU with
    gloo as well as on GPU with NCCL). It modifies `module` in place and returns it.
    """
    if not info.distributed:
        return module
    if fsdp:
        from open_clip.transformer import ResidualAttentionBlock
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world,))
        scalars = set(fsdp_ignored(module))
        for sub in module.modules():
            if isinstance(sub, ResidualAttentionBlock):
                fully_shard(sub, mesh=mesh)
        fully_shard(module, mesh=mesh, ignored_params=scalars)
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def fsdp_ignored(module: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP2 cannot shard (0-dim, e.g. the logit scale): they stay replicated and the engine
    averages their gradients by hand, as it does the Distiller's."""
    return [p for p in module.parameters() if p.ndim == 0]


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def no_sync_context(module: nn.Module):
    """A factory of contexts that skip gradient synchronisation (DDP `no_sync`, FSDP2's flag), or None."""
    if is_fsdp(module):

        @contextmanager
        def skip():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return skip
    return getattr(module, "no_sync", None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a mix of plain and sharded (DTensor) gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(
        torch.stack([_local(torch.linalg.vector_norm(g.detach(), 2.0)) for g in grads]), 2.0
    )
    coef = min(1.0, float(max_norm / (total + 1e-6)))
    if coef < 1.0:
        for g in grads:
            g.detach().mul_(coef)
    return total


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place (no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


def all_gather_object(obj: object) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` (a one-element list on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
