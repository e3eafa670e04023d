"""Atomic training checkpoints (issue 7): everything `--resume` needs to continue exactly.

A checkpoint holds the student and Distiller weights, optimizer, scheduler and (when used) grad-scaler
state, the RNG states of every rank (python, numpy, torch CPU and CUDA), the data position of every
stream, the step and the resolved config. It is written to a temporary name and renamed, with a small
`last.json` sidecar (step, time) written the same way after it, so a run killed at any moment leaves
the previous complete checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch

from clipdistill.errors import UserError, error_summary
from clipdistill.paths import atomic_path

log = logging.getLogger(__name__)

LAST = "last.pt"
SIDECAR = "last.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, state: dict) -> Path:
    """Write `state` to `<output_dir>/checkpoints/last.pt` atomically; returns the path."""
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LAST
    sidecar = folder / SIDECAR
    tmp = atomic_path(path)
    try:  # an exception or Ctrl-C mid-write leaves no half-written file (a kill: the next run removes it)
        torch.save(state, tmp)
        os.replace(tmp, path)
        tmp = atomic_path(sidecar)
        tmp.write_text(json.dumps({"step": int(state.get("step", 0)), "time": time.time()}))
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("checkpoint saved at step %s: %s", state.get("step"), path)
    return path


def has_checkpoint(output_dir: str | Path) -> bool:
    return (checkpoint_dir(output_dir) / LAST).exists()


def load_checkpoint(output_dir: str | Path) -> dict:
    """The last checkpoint of a run (UserError when there is none or it cannot be read)."""
    path = checkpoint_dir(output_dir) / LAST
    if not path.exists():
        raise UserError(f"--resume: no checkpoint at '{path}'; start the run without --resume")
    try:
        # Our own file holds RNG states and config dicts, not only tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise UserError(
            f"cannot read checkpoint '{path}' ({error_summary(err)}); delete it to restart the run"
        ) from err


def model_and_optimizer_state(
    student, forward_module, distiller, optimizer, *, fsdp: bool
) -> tuple[dict, dict]:
    """(student state dict, optimizer state dict), full and on CPU. Under FSDP every rank must call
    this (it gathers the shards); rank 0 gets the full dicts, the others empty ones."""
    if not fsdp:
        return student.state_dict(), optimizer.state_dict()
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(forward_module, options=opts)
    container = nn.ModuleDict({"wrapped": forward_module, "distiller": distiller})
    return {k.removeprefix("student."): v for k, v in model.items()}, get_optimizer_state_dict(
        container, optimizer, options=opts
    )


def load_model_and_optimizer_state(
    ckpt: dict, student, forward_module, distiller, optimizer, *, fsdp: bool
) -> None:
    """The inverse of `model_and_optimizer_state` (every rank reads the full dicts from the file)."""
    if not fsdp:
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(
        forward_module, {f"student.{k}": v for k, v in ckpt["student"].items()}, options=opts
    )
    container = nn.ModuleDict({"wrapped": forward_module, "distiller": distiller})
    set_optimizer_state_dict(container, optimizer, optim_state_dict=ckpt["optimizer"], options=opts)


# What must not change between a checkpoint and its resume (steps, logging and evaluation may).
RESUME_KEYS = ("student", "teacher", "losses", "data.train", "data.batch_size", "seed", "optim.accum_steps")


def _dig(d: object, key: str) -> object:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_resumable(before: dict, now: dict) -> None:
    """Refuse to resume a checkpoint under a config that would make it another run."""
    for key in RESUME_KEYS:
        a, b = _dig(before, key), _dig(now, key)
        if a != b:
            raise UserError(
                f"--resume: {key} was {a!r} in the checkpoint and is {b!r} now; keep it or start a new output_dir"
            )


def own_streams(data: dict, rank: int, workers: int) -> dict:
    """A rank's data state with only the streams it owns (stream = rank x workers + worker)."""
    return {**data, "positions": {s: p for s, p in data["positions"].items() if s // workers == rank}}


def merge_data_states(states: list[dict]) -> dict:
    """Every rank's data state in one: all stream positions, summed sample and skip counts."""
    merged = dict(states[0])
    merged["positions"] = {s: p for st in states for s, p in st["positions"].items()}
    merged["samples"] = sum(st["samples"] for st in states)
    skipped: dict[str, int] = {}
    for st in states:
        for reason, n in st["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    merged["skipped"] = skipped
    return merged
