"""Periodic and final evaluation of a student through `clipdistill.eval.runner` (docs/methods.md section 10).

`run_eval` is the one place that calls the runner (imported lazily: training never needs it).
"""

from __future__ import annotations

import logging

from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel

log = logging.getLogger(__name__)


def parse_dataset(spec: str) -> tuple[str, str]:
    name, _, split = spec.partition(":")
    return name, split or "test"


def run_eval(
    model: ClipModel,
    dataset: str,
    split: str,
    *,
    data_root: str | None = None,
    every: int = 1,
    batch_size: int = 64,
    cache: bool = False,
) -> dict:
    """Metrics of `model` on one dataset split (every `every`-th sample) as {name: value}.

    cache: let the runner cache class text embeddings (worth it for a frozen teacher, not for a
    student whose weights change between evaluations).
    """
    from clipdistill.eval import runner

    record = runner.evaluate(
        model,
        dataset,
        split,
        data_root=data_root,
        every=every,
        batch_size=batch_size,
        cache=cache,
        progress=False,
    )
    return {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))}


def load_trained_student(
    spec: str, text: str, weights: str, teacher: ClipModel | None, *, image_size: int | None = None
) -> ClipModel:
    """A distilled student, ready to evaluate, from its preset spec, `student.text` setting and the
    `student.pt` a run wrote (at the run's `student.image_size`): `text="teacher"` pairs the image tower
    with `teacher`'s frozen text tower."""
    from clipdistill.models.factory import parse_spec
    from clipdistill.models.students import build_student

    if text == "teacher" and teacher is None:
        raise UserError(f"student {spec} uses its teacher's text tower; pass the teacher to evaluate it")
    spec = str(parse_spec(spec).with_checkpoint(weights))
    dim = teacher.embed_dim if teacher is not None else 0
    return build_student(spec, text, teacher, dim, image_size=image_size).eval()


def eval_model(student: ClipModel, teacher: ClipModel | None) -> ClipModel | None:
    """The student as an evaluable model: an image-only student trained from a cache gets the real
    teacher's text tower back; None when that teacher is not available."""
    from clipdistill.models.students import ImageOnlyStudent
    from clipdistill.train.build import CachedTextStandIn

    if isinstance(student, ImageOnlyStudent) and isinstance(student.text_model, CachedTextStandIn):
        if teacher is None:
            return None
        object.__setattr__(student, "text_model", teacher)
    return student


def evaluate_student(student: ClipModel, cfg, teacher: ClipModel | None = None) -> dict[str, dict]:
    """{dataset: metrics} for every `cfg.eval.datasets` entry (empty when evaluation is unavailable)."""
    model = eval_model(student, teacher)
    if model is None:
        log.warning(
            "evaluation skipped: this image-only student needs its teacher's text tower; set teacher.spec"
        )
        return {}
    results = {}
    for spec in cfg.eval.datasets:
        name, split = parse_dataset(spec)
        every = int(cfg.eval.subsample.get(name, 1))
        results[f"{name}:{split}"] = run_eval(
            model, name, split, data_root=cfg.data.root, every=every, batch_size=cfg.eval.batch_size
        )
        log.info(
            "eval %s:%s%s: %s",
            name,
            split,
            f" (every {every}th sample)" if every > 1 else "",
            results[f"{name}:{split}"],
        )
    return results
