"""Data of the headline study (`benchmarks/students.py`): the teacher, student towers, the stored
frozen-prefix activations of every training and evaluation set (one cache file per set and prefix, under
runs/students/cache), class embeddings and metrics. No training here."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/students.py

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CELLS = RESULTS / "students"
WORK = ROOT.parent / "runs" / "students"
ARCH = "efficientnet-lite0"
FREEZE_MIN = 4  # prefixes are stored after this many blocks; deeper freezing runs the extra blocks once
# name: (split, every, captions, mirror views). CIFAR-10 train: every 4th image, centre views only (the
# budget of collecting prefixes on this 2-core CPU); Flickr8k train: every image and its mirror image.
# Students with `crops` > 0 also train on that many random resized crops of each Flickr8k train image
# (stored apart, CROP_SCALE of the image's area, each with the teacher's embedding of the same crop).
TRAIN = {"flickr8k": ("train", 1, True, True), "cifar10": ("train", 4, False, False)}
CROP_SCALE = (0.4, 1.0)
EVAL = {
    "cifar10": ("test", 5),
    "cifar100-916": ("test", 1),
    "imagenet-1k-sample": ("test", 1),
    "flickr8k": ("test", 1),
    "dev": ("dev", 1),
    "dtd-10": ("test", 1),
    "mnist": ("test", 5),
}


# The teacher's own image tower (TinyCLIP inheritance: its blocks and head) at a lower resolution; with
# `depths`, fewer blocks in the stages after the stored prefix (TinyCLIP's manual inheritance, first blocks).
# Stored prefixes, one cache file each: (family, init, resolution), after FREEZE_MIN blocks; a fourth
# element stores them after that many blocks instead (fewer: a student that trains more of its trunk).
PREFIX_KEYS = [
    ("lite0", "pretrained", 128),
    ("lite0", "pretrained", 160),
    ("lite0", "pretrained", 144),
    ("lite0", "random", 128),
    ("lite2i", "inherit", 192),
    ("lite2i", "inherit", 160),
    ("lite2i", "inherit", 128),
]

_TEACHER: list = []


def teacher():
    """The offline teacher (`clipdistill teacher build` into the cache folder), its tower in ONNX Runtime."""
    from clipdistill.models.composed import load_teacher
    from clipdistill.paths import cache_dir

    if not _TEACHER:
        t = load_teacher(cache_dir() / "teacher")
        t.use_onnx_tower()
        _TEACHER.append(t)
    return _TEACHER[0]


def student_model(init: str, size: int, seed: int = 0, family: str = "lite0", depths=None):
    from clipdistill.models.students import create_student

    torch.manual_seed(seed)
    if family == "lite2i":
        from clipdistill.models.composed_inherit import inherited_image_student

        return inherited_image_student(teacher(), image_size=size, depths=list(depths) if depths else None)
    model = create_student(ARCH, embed_dim=512, init=init, image_size=size)
    if depths is not None:
        from clipdistill.models.freeze import keep_first_blocks

        keep_first_blocks(model, list(depths))
    return model


def prefix_depth(key: tuple) -> int:
    """The blocks a stored prefix of `key` has run."""
    return key[3] if len(key) > 3 else FREEZE_MIN


def _dataset(name: str) -> str:
    return "flickr8k" if name == "dev" else name


def collected(
    kind: str,
    name: str,
    split: str,
    every: int,
    captions: bool,
    flip: bool,
    keys: list[tuple],
    crops: int = 0,
) -> dict:
    """{prefix key: Activations} of one set, each key's computed once (the missing ones in one pass over
    the images) and then loaded from runs/students/cache. With `crops`, the set's `crops` random resized
    crops alone (a file of their own, joined to the centre views by `with_crops`)."""
    from clipdistill.data.shards import dataset_info, iter_samples, subsample
    from clipdistill.models.freeze import split_image_tower
    from clipdistill.train.prefix import collect

    def path(key) -> Path:
        family, init, size = key[:3]
        tag = f"-crops{crops}" if crops else ""
        depth = "" if prefix_depth(key) == FREEZE_MIN else f"-b{prefix_depth(key)}"
        return WORK / "cache" / f"{kind}-{name}-{split}-{every}{tag}-{family}-{init}{size}{depth}.pt"

    missing = [k for k in keys if not path(k).exists()]
    if missing:
        prefixes = {}
        for key in missing:
            family, init, size = key[:3]
            model = student_model(init, size, family=family).eval()
            prefix = split_image_tower(model, prefix_depth(key))[0].eval()
            prefixes[key] = (prefix.to(memory_format=torch.channels_last), model)
        info = dataset_info(_dataset(name))
        samples = subsample(iter_samples(info.shards(split)), every)
        views = (
            dict(flip=flip, centre=True)
            if not crops
            else dict(centre=False, crops=crops, crop_scale=CROP_SCALE)
        )
        acts = collect(prefixes, teacher(), samples, captions=captions, **views, desc=f"{name}/{split}")
        for key, a in acts.items():
            _save(path(key), a)
    return {k: torch.load(path(k), weights_only=False) for k in keys}


def training_set(name: str, key: tuple, crops: int = 0):
    """A training set's stored activations for one prefix: centre (and mirror) views, then `crops`
    random crops when asked (Flickr8k train only)."""
    from clipdistill.train.prefix import join_views

    split, every, caps, flip = TRAIN[name]
    acts = collected("train", name, split, every, caps, flip, [key])[key]
    if crops and name == "flickr8k":
        acts = join_views(acts, collected("train", name, split, every, caps, False, [key], crops)[key])
    return acts


def collect_all(keys=PREFIX_KEYS) -> None:
    """Every stored prefix of every training and evaluation set (one pass over each set's images)."""
    for name, (split, every, caps, flip) in TRAIN.items():
        collected("train", name, split, every, caps, flip, list(keys))
    for name, (split, every) in EVAL.items():
        collected("eval", name, split, every, name in ("flickr8k", "dev"), False, list(keys))


def _save(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def class_embeddings(name: str) -> torch.Tensor:
    from clipdistill.data.shards import dataset_info
    from clipdistill.eval.runner import cached_class_embeddings

    path = WORK / "cache" / f"classes-{name}.pt"
    if path.exists():
        return torch.load(path)
    info = dataset_info(name)
    emb = cached_class_embeddings(teacher(), info.classnames, info.templates)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(emb, path)
    return emb


def metrics(name: str, image_emb: torch.Tensor, acts) -> dict:
    from clipdistill.eval.retrieval import retrieval_metrics
    from clipdistill.eval.zeroshot import classification_metrics, zeroshot_logits

    if acts.text is not None:
        m = retrieval_metrics(image_emb, acts.text, acts.text_owner)
        m["ret_mean"] = statistics.fmean(m.values())
        return m
    return classification_metrics(zeroshot_logits(image_emb, class_embeddings(_dataset(name))), acts.labels)


# --------------------------------------------------------------------------- training


def deeper(acts, model, freeze: int, key: tuple):
    """Activations after `freeze` blocks, from those stored for prefix `key` (frozen blocks run once)."""
    from clipdistill.train.prefix import Activations

    stored = prefix_depth(key)
    if freeze == stored:
        return acts
    if freeze < stored:
        raise SystemExit(f"freeze {freeze} needs a prefix stored after {freeze} blocks (this one: {stored})")
    from clipdistill.models.freeze import split_image_tower

    blocks = split_image_tower(model, stored)[1].blocks[: freeze - stored].eval()
    with torch.no_grad():
        views = [
            torch.cat([blocks(v[i : i + 256].float()).half() for i in range(0, v.shape[0], 256)])
            for v in acts.prefix
        ]
    return Activations(
        torch.stack(views), acts.teacher_image, acts.text, acts.text_owner, acts.keys, acts.labels
    )


def eval_embeddings(suffix, model, key: tuple, freeze: int, only=None):
    """(name, student embeddings, stored activations) of every evaluation set in EVAL (or those in `only`),
    through `model`'s blocks up to `freeze` and then `suffix`."""
    from clipdistill.train.prefix import embed

    for name, (split, every) in EVAL.items():
        if only is not None and name not in only:
            continue
        acts = collected("eval", name, split, every, name in ("flickr8k", "dev"), False, [key])[key]
        acts = deeper(acts, model, freeze, key)
        yield name, embed(suffix, acts.prefix[0]), acts


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
