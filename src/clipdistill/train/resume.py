"""What a checkpoint holds of a run (engine.py's `Run`) and how a run resumes from one, bit-exactly:
weights, optimiser and schedule, the Distiller's state (memory banks), every rank's RNG state and the
data position of every shard stream (train/streams.py), under keys that stay the same from release to
release so old checkpoints resume."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from clipdistill.data.loader import DataState
from clipdistill.train.checkpoint import (
    check_resumable,
    load_model_and_optimizer_state,
    merge_data_states,
    model_and_optimizer_state,
    own_streams,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clipdistill.train.config import TeacherConfig, move_loss_groups
from clipdistill.train.config_io import to_plain
from clipdistill.train.distributed import all_gather_object
from clipdistill.train.optim import apply_changed_optim
from clipdistill.train.streams import CHECKPOINT_KEYS

if TYPE_CHECKING:
    from clipdistill.train.engine import Run

log = logging.getLogger("clipdistill.train.engine")  # the run's messages, under one name


def save_run(run: Run) -> dict:
    """Save a checkpoint of `run` (rank 0 writes; every rank contributes); returns the full student state."""
    student_state, optim_state = model_and_optimizer_state(
        run.student, run.forward_module, run.distiller, run.optimizer, fsdp=run.fsdp
    )
    workers = max(1, run.cfg.data.workers)
    mine = {
        key: own_streams(_data_state(run, key).state_dict(), run.info.rank, workers)
        for key in CHECKPOINT_KEYS.values()
    }
    states = all_gather_object({"rng": rng_state(), **mine})
    if not run.info.is_main:
        return student_state
    save_checkpoint(
        run.out,
        {
            "step": run.step,
            "student": student_state,
            "distiller": run.distiller.state_dict(),
            "optimizer": optim_state,
            "scheduler": run.scheduler.state_dict(),
            "scaler": None,  # bf16 and fp32 need no loss scaling
            "rng": [st["rng"] for st in states],
            **{key: merge_data_states([st[key] for st in states]) for key in CHECKPOINT_KEYS.values()},
            "world": run.info.world,
            "config": run.cfg.to_dict(),
            "eval": run.last_eval,
            "logs": run.last_logs,
        },
    )
    return student_state


def restore_run(run: Run, ckpt: dict) -> None:
    """Put `run` where checkpoint `ckpt` left it (optimiser settings changed since then take effect)."""
    info = run.info
    # checkpoints of older releases recorded optimiser-group overrides under losses.groups
    recorded, config = move_loss_groups(ckpt.get("config", {}), warn=False), run.cfg.to_dict()
    if isinstance(recorded.get("teacher"), dict):  # teacher settings added since (teacher.member): defaults
        recorded = {**recorded, "teacher": {**to_plain(TeacherConfig()), **recorded["teacher"]}}
    check_resumable(recorded, config)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    load_model_and_optimizer_state(
        ckpt, run.student, run.forward_module, run.distiller, run.optimizer, fsdp=run.fsdp
    )
    run.distiller.load_state_dict(ckpt["distiller"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.step = int(ckpt["step"])
    run.last_eval = ckpt.get("eval", {})
    run.last_logs = dict(ckpt.get("logs") or {})
    before, now = recorded.get("optim", {}), config["optim"]
    changed = apply_changed_optim(run.optimizer, run.scheduler, before, now, fresh)
    if changed and info.is_main:
        log.warning(
            "--resume: applying the changed optimiser settings from step %d: %s",
            run.step,
            "; ".join(f"optim.{k} {before[k]!r} -> {now[k]!r}" for k in changed),
        )
    rngs = ckpt["rng"]
    set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
    for key in CHECKPOINT_KEYS.values():  # "data" is always there; an older checkpoint may lack the others
        if key == "data" or ckpt.get(key) is not None:
            _set_data_state(run, key, restored_data(ckpt[key], info.is_main))
    if ckpt.get("world") != info.world:
        log.warning(
            "resuming a %s-process run on %d processes: the data order changes", ckpt.get("world"), info.world
        )
    log.info("resumed from step %d", run.step)


def restored_data(raw: dict, is_main: bool) -> DataState:
    state = DataState.from_state(raw)
    if not is_main:  # totals live on rank 0 and are summed again at the next checkpoint
        state.samples, state.skipped.reasons = 0, {}
    return state


def _data_state(run: Run, key: str) -> DataState:
    """The data position saved under checkpoint key `key` ("data", "data_unpaired")."""
    stream = next((s for s in run.streams if s.checkpoint_key == key), None)
    return stream.state if stream is not None else run.idle_states[key]


def _set_data_state(run: Run, key: str, state: DataState) -> None:
    stream = next((s for s in run.streams if s.checkpoint_key == key), None)
    if stream is not None:
        stream.state = state
    else:
        run.idle_states[key] = state
