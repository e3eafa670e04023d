"""What a run shows and leaves behind: the progress bar, TensorBoard scalars, the JSON summary and the
final student weights. Everything here is a no-op on ranks other than 0 (`enabled=False`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from clipdistill.models.factory import parse_spec
from clipdistill.paths import atomic_path

if TYPE_CHECKING:
    from clipdistill.train.engine import Run

log = logging.getLogger(__name__)


class RunLogger:
    """tqdm bar (with ETA) + TensorBoard writer under `<output_dir>/tensorboard`."""

    def __init__(self, output_dir: Path, *, enabled: bool, total: int, initial: int = 0) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = tqdm(
            total=total, initial=initial, desc="distill", unit="step", disable=not enabled, dynamic_ncols=True
        )
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log_step(self, step: int, logs: dict, optimizer, epoch: float | None, skipped: dict) -> None:
        if not self.enabled:
            return
        for key, value in logs.items():
            tag = {"images_per_s": "speed/images_per_s", "grad_norm": "optim/grad_norm"}.get(
                key, f"loss/{key}"
            )
            self.writer.add_scalar(tag, value, step)
        for group in optimizer.param_groups:
            self.writer.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
        if epoch is not None:
            self.writer.add_scalar("data/epoch", epoch, step)
        self.writer.add_scalar("data/skipped", sum(skipped.values()), step)
        log.debug("step %d %s", step, {k: round(v, 5) for k, v in logs.items()})

    def advance(self, logs: dict) -> None:
        if not self.enabled:
            return
        post = {"loss": f"{logs.get('loss', float('nan')):.4f}"}
        if "images_per_s" in logs:
            post["img/s"] = f"{logs['images_per_s']:.1f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def log_eval(self, step: int, results: dict) -> None:
        if not self.enabled:
            return
        for dataset, metrics in results.items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"eval/{dataset}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def run_summary(run: Run, steps: int, elapsed: float, logs: dict) -> dict:
    """The summary of a finished session of `run` (`steps` optimiser steps in `elapsed` seconds): the
    last logs, skip counts, what the student was trained on and from, the last evaluation."""
    cfg, unpaired = run.cfg, run.unpaired
    return {
        "steps": run.step,
        "steps_this_session": steps,
        "seconds": round(elapsed, 1),
        "images_per_s": round(steps * cfg.data.batch_size / max(elapsed, 1e-9), 2),
        "final": logs,
        "epoch": run._epoch(),
        "skipped": dict(run.paired.state.skipped.reasons),
        "unpaired_samples": unpaired.state.samples if unpaired is not None else None,
        "unpaired_skipped": dict(unpaired.state.skipped.reasons) if unpaired is not None else None,
        "teacher_mode": run.mode,
        "student_spec": cfg.student.spec,
        "student_init": _student_init(run),
        "trained_on": {
            "pairs": list(cfg.data.train),
            "unpaired_images": list(cfg.data.unpaired),
            "texts": list(cfg.data.texts),
        },
        "eval": run.last_eval,
        "world": run.info.world,
    }


def _student_init(run: Run) -> dict:
    """How the student started; with automatic inheritance, its sparsity target and ramp too."""
    init = run.cfg.student.build_kwargs()
    if run.masked is not None:
        init.update(sparsity=run.cfg.student.sparsity, sparsity_warmup=run.masked.cfg.warmup_steps)
    return init


def pruned_student(run: Run) -> tuple:
    """Automatic inheritance: (the pruned student, its full state, the sparsity record: target, final
    expected sparsity and parameter counts per tower before and after pruning)."""
    from clipdistill.models.pruning import prune_student, tower_params

    masked = run.masked
    with torch.no_grad():
        expected = {tower: round(float(v), 6) for tower, v in masked.expected_sparsity().items()}
    pruned = prune_student(run.student)
    inner = pruned if masked is run.student else pruned.image
    record = {
        "target": run.cfg.student.sparsity,
        "warmup_steps": masked.cfg.warmup_steps,
        "expected": expected,
        "params_before": tower_params(masked.base.model),
        "params_after": tower_params(inner.model),
        "towers": list(masked.cfg.towers),
    }
    return pruned, pruned.state_dict(), record


def finished_summary(output_dir: Path, step: int) -> dict:
    """The summary of a run that had already reached its last step, as it is on disk."""
    try:
        summary = json.loads((Path(output_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"steps": step}
    return {**summary, "already_finished": True}


def _atomic_json(path: Path, data: dict) -> None:
    tmp = atomic_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def openclip_state(student, state: dict) -> dict:
    """The part of the student's full state dict that is its open_clip model's (loadable as
    `student:NAME@FILE`; for an image-only student, the preset whose image tower was trained)."""
    prefix = "image.model." if hasattr(student, "image") else "model." if hasattr(student, "model") else ""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


PRUNED_DIR = "student_pruned"


def pruned_folder(output_dir: Path, student) -> Path | None:
    """For a pruned student (automatic inheritance), write its open_clip model as a folder `openclip:DIR`
    rebuilds (the pruned per-layer sizes in its config, models/pruned.py) and return it; else None."""
    from clipdistill.models.export import export_openclip
    from clipdistill.models.openclip import PRUNED_KEY

    model = getattr(student, "image", student)
    if not getattr(getattr(model, "model", None), PRUNED_KEY, None):
        return None
    folder = output_dir / PRUNED_DIR
    export_openclip(model, folder, verify=True)
    return folder


def write_summary(output_dir: Path, summary: dict, student, state: dict, cfg) -> Path:
    """Write `student.pt` (open_clip weights of the student, from its full `state`) and `summary.json`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    from clipdistill.models.composed_inherit import ComposedStudent, save_inherited

    weights = output_dir / "student.pt"
    inherited = getattr(student, "image", student)
    if isinstance(
        inherited, ComposedStudent
    ):  # the composed teacher's towers: every weight, reloadable whole
        prefix = "image." if inherited is not student else ""
        save_inherited(
            inherited, weights, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
    else:
        tmp = atomic_path(weights)
        try:
            torch.save(openclip_state(student, state), tmp)
            os.replace(tmp, weights)
        finally:
            tmp.unlink(missing_ok=True)
    summary = {**summary, "student_weights": str(weights)}
    spec = parse_spec(cfg.student.spec)
    pruned = pruned_folder(output_dir, student)
    if pruned is not None:  # automatic inheritance: the pruned architecture, rebuilt from its folder
        reload = f"openclip:{pruned}"
        if cfg.student.text == "own":
            summary["student_reload_spec"] = reload
        else:
            summary["student_reload"] = f"{reload} (its image tower) + the teacher's text tower"
    elif cfg.student.text == "own" or isinstance(inherited, ComposedStudent):
        summary["student_reload_spec"] = str(spec.with_checkpoint(weights))
    else:  # the image tower of a preset built at the teacher's width; text comes from the teacher
        summary["student_reload"] = (
            f"create_student('{spec.name}', embed_dim=<teacher width>, checkpoint='{weights}') + the teacher's text tower"
        )
    _atomic_json(output_dir / "summary.json", summary)
    _atomic_json(output_dir / "config.json", cfg.to_dict())
    return weights
