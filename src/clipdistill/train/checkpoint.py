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
import random
import time
from pathlib import Path

import numpy as np
import torch

from clipdistill.errors import UserError
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
    tmp = atomic_path(path)
    torch.save(state, tmp)
    os.replace(tmp, path)
    sidecar = folder / SIDECAR
    tmp = atomic_path(sidecar)
    tmp.write_text(json.dumps({"step": int(state.get("step", 0)), "time": time.time()}))
    os.replace(tmp, sidecar)
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
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"cannot read checkpoint '{path}' ({str(err)[:200]}); delete it to restart the run") from err
