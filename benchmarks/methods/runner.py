"""Running one cell: the shared preparation (teacher, caches, CLIP-CID curation), a cell's training config
from its recipe, training, and evaluation."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from . import layout
from .grid import (
    B2N,
    B2N_KEY,
    CLIP_CID,
    EVAL,
    METHODS,
    PROBE,
    PROBE_KEY,
    SETTINGS,
    TEXT_BATCH,
    TEXT_CORPUS,
    TRACKS,
    UNPAIRED_BATCH,
    VARIANTS,
    Budget,
    Cell,
    budget_name,
)


def prepare(
    teacher_dir: Path, data_root: str | None, tracks: list[str] | None = None, dclip: bool = False
) -> dict:
    """The teacher (built when missing), its cache on every track's data (centre view), CLIP-CID's
    keep-list and cluster centres computed from the cached teacher embeddings, and with `dclip` DCLIP's
    meta-teacher extras in each track's cache."""
    from clipdistill.curate.balance import BalanceConfig, balance
    from clipdistill.curate.cluster import ClusterConfig, cluster
    from clipdistill.curate.io import Embeddings, load_teacher_cache
    from clipdistill.data.augment import AugmentPolicy
    from clipdistill.data.loader import resolve_shards
    from clipdistill.data.teacher_cache import build_cache
    from clipdistill.models.composed import load_teacher
    from clipdistill.models.dclip_teacher import build_dclip_extras
    from clipdistill.paths import cache_dir

    if not (teacher_dir / "teacher.json").exists():
        from clipdistill.models.teacher_build import TeacherBuildConfig, build_teacher

        build_teacher(TeacherBuildConfig(), teacher_dir, data_root)
    teacher = load_teacher(teacher_dir)
    prep = {"teacher": teacher, "caches": {}, "unpaired_caches": {}, "curation": {}}
    center = AugmentPolicy(center_view=True)

    def cache_of(specs: list[str], text: bool) -> Path:
        shards = [p for spec in specs for p in resolve_shards(spec, data_root)[0]]
        name = "+".join(s.replace(":", "-") for s in specs)
        root = cache_dir() / "teacher-cache" / f"{name}-{teacher.fingerprint()}-k1"
        return build_cache(teacher, shards, root, augmentations=1, policy=center, text=text).root

    for track, spec in TRACKS.items():
        if tracks is not None and track not in tracks:
            continue
        prep["caches"][track] = cache_of(spec["train"], True)
        if dclip:
            build_dclip_extras(
                teacher,
                [p for s in spec["train"] for p in resolve_shards(s, data_root)[0]],
                prep["caches"][track],
            )
        if spec.get("unpaired"):
            prep["unpaired_caches"][track] = cache_of(spec["unpaired"], False)
        out = layout.RUNS / "curation" / f"{track}-beta{CLIP_CID['beta']}-k{CLIP_CID['k']}"
        if not (out / "cluster" / "centres.npy").exists():
            emb = load_teacher_cache(prep["caches"][track])
            kept = balance(emb, BalanceConfig(beta=CLIP_CID["beta"], plots=False), out / "balance")
            rows = np.flatnonzero(kept.keep)
            keys = emb.key_list()
            arrays, names = [emb.rows(rows)], [keys[i] for i in rows]
            if spec.get(
                "unpaired"
            ):  # k-means over every image the track trains on (the unpaired ones filtered too)
                extra, extra_keys = _unpaired_embeddings(prep["unpaired_caches"][track], spec, data_root)
                arrays.append(extra)
                names += extra_keys
            sub = Embeddings(array=np.ascontiguousarray(np.concatenate(arrays)), keys=names)
            cluster(sub, ClusterConfig(k=CLIP_CID["k"], plots=False), out / "cluster")
        prep["curation"][track] = {
            "keep": str(out / "balance" / "keep.txt"),
            "centres": str(out / "cluster" / "centres.npy"),
        }
    return prep


def _unpaired_embeddings(cache_root: Path, spec: dict, data_root: str | None) -> tuple[np.ndarray, list[str]]:
    """Cached teacher embeddings of a track's caption-less images that its class filter keeps."""
    from clipdistill.curate.io import load_teacher_cache
    from clipdistill.data.loader import keep_record, read_raw, resolve_shards
    from clipdistill.data.shards import SkipCounter
    from clipdistill.train.build import data_filter
    from clipdistill.train.config import DataConfig

    emb = load_teacher_cache(cache_root)
    labels, _ = data_filter(
        DataConfig(train=spec["train"], unpaired=spec["unpaired"], root=data_root, filter=spec.get("filter"))
    )
    keys = emb.key_list()
    if labels is None:
        return np.asarray(emb.rows(np.arange(len(keys)))), [f"u/{k}" for k in keys]
    shards = [p for name in spec["unpaired"] for p in resolve_shards(name, data_root)[0]]
    kept = {r["__key__"] for r in read_raw(shards, SkipCounter()) if keep_record(r, labels, None)}
    rows = np.array([i for i, k in enumerate(keys) if k in kept])
    return np.asarray(emb.rows(rows)), [f"u/{keys[i]}" for i in rows]


def recipe(method: str, curation: dict) -> dict:
    """The `losses` section a cell of `method` trains with (a fresh copy)."""
    source = METHODS[method].source
    if (
        method in VARIANTS
    ):  # configs/relational.yaml with the variant's options; `clip` is the task loss's weight
        losses = json.loads(
            json.dumps(yaml.safe_load((layout.REPO / "configs" / "relational.yaml").read_text())["losses"])
        )
        losses["relational"].update({k: v for k, v in source.items() if k != "clip"})
        losses.update({k: v for k, v in source.items() if k == "clip"})
        return losses
    losses = (
        source
        if isinstance(source, dict)
        else yaml.safe_load((layout.REPO / "configs" / source).read_text())["losses"]
    )
    losses = json.loads(json.dumps(losses))
    if "cluster" in losses:
        losses["cluster"]["centres"] = curation["centres"]
    return losses


def recipe_groups(method: str) -> dict:
    """The optimiser-group overrides (`optim.groups`) of the recipe file `method` trains with ({} for none)."""
    source = "relational.yaml" if method in VARIANTS else METHODS[method].source
    if isinstance(source, dict):
        return {}
    data = yaml.safe_load((layout.REPO / "configs" / source).read_text())
    return json.loads(json.dumps((data.get("optim") or {}).get("groups") or {}))


def run_config(
    cell: Cell,
    budget: Budget,
    teacher_dir: Path,
    prep: dict,
    data_root: str | None,
    train_dir: Path | None = None,
) -> dict:
    curation = prep["curation"][cell.track]
    cfg = {
        "student": {"spec": budget.student, "text": SETTINGS[cell.setting]},
        "teacher": {"spec": f"teacher:{teacher_dir}", "cache": str(prep["caches"][cell.track])},
        "data": {
            "train": TRACKS[cell.track]["train"],
            "root": data_root,
            "batch_size": budget.batch_size,
            "workers": 1,
        },
        "losses": recipe(cell.method, curation),
        "optim": {"lr": budget.lr, "warmup_steps": budget.warmup_steps},
        "steps": budget.steps,
        "output_dir": str(train_dir or layout.RUNS / budget_name(budget) / cell.name),
        "seed": cell.seed,
        "threads": budget.threads,
        "checkpoint_every": 50,
        "log_every": 10,
    }
    groups = recipe_groups(cell.method)
    if groups:
        cfg["optim"]["groups"] = groups
    if cell.method == "clip_cid":
        cfg["data"]["keep"] = curation["keep"]
    track = TRACKS[cell.track]
    if track.get("unpaired"):
        cfg["data"].update(unpaired=track["unpaired"], unpaired_batch_size=UNPAIRED_BATCH)
        cfg["teacher"]["unpaired_cache"] = str(prep["unpaired_caches"][cell.track])
    if track.get("filter"):
        cfg["data"]["filter"] = track["filter"]
    if cell.setting == "both":  # the student's own text tower also learns from text alone
        cfg["data"].update(texts=TEXT_CORPUS, text_batch_size=TEXT_BATCH)
    return cfg


def evaluate(model, data_root: str | None, cache: bool = False) -> dict:
    from clipdistill.train.evaluate import run_eval

    out = {}
    for key, (split, every) in EVAL.items():
        dataset = key.removesuffix("-dev")
        out[key] = {
            "every": every,
            **run_eval(model, dataset, split, data_root=data_root, every=every, cache=cache),
        }
    out[B2N_KEY] = base2novel(model, data_root, cache)
    return out


def _protocol(model, subset: dict, protocol: str, data_root: str | None, cache: bool, **options) -> dict:
    """`model`'s numeric metrics under an evaluation protocol on `subset` (its dataset, split and every)."""
    from clipdistill.eval import runner

    record = runner.evaluate(
        model,
        subset["dataset"],
        subset["split"],
        protocol,
        data_root=data_root,
        every=subset["every"],
        cache=cache,
        progress=False,
        **options,
    )
    return {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))}


def base2novel(model, data_root: str | None, cache: bool = False) -> dict:
    """CIFAR-10 base / novel / HM of `model` (B2N's subset)."""
    return {"every": B2N["every"], **_protocol(model, B2N, "base2novel", data_root, cache)}


def probe(model, data_root: str | None, cache: bool = False) -> dict:
    """CIFAR-10 linear-probe metrics of `model`'s frozen image embeddings (PROBE's subsets)."""
    split, every = PROBE["train_split"], PROBE["train_every"]
    metrics = _protocol(model, PROBE, "linear_probe", data_root, cache, train_split=split, train_every=every)
    return {"every": PROBE["every"], "train_every": every, **metrics}


def probe_cell(path: Path, teacher, data_root: str | None) -> bool:
    """Add the linear probe to a finished cell's record; False when it already has one."""
    from clipdistill.train.evaluate import load_trained_student

    record = json.loads(path.read_text())
    if PROBE_KEY in record["metrics"]:
        return False
    budget, cell = Budget(**record["budget"]), Cell(**record["cell"])
    out = layout.RUNS / budget_name(budget) / cell.name
    summary = json.loads((out / "summary.json").read_text())
    student = load_trained_student(
        budget.student, SETTINGS[cell.setting], summary["student_weights"], teacher
    )
    start = time.time()
    record["metrics"][PROBE_KEY] = probe(student, data_root)
    record["probe_seconds"] = round(time.time() - start, 1)
    layout.write_json(path, record)
    return True


def run_cell(
    cell: Cell,
    budget: Budget,
    teacher_dir: Path,
    prep: dict,
    data_root: str | None,
    folder: Path | None = None,
    train_dir: Path | None = None,
) -> dict:
    """Train and evaluate one cell (resuming its checkpoint) and write its record to `folder`
    (default: the budget's cells folder)."""
    from clipdistill.train.checkpoint import has_checkpoint
    from clipdistill.train.config import config_from_dict
    from clipdistill.train.engine import train
    from clipdistill.train.evaluate import load_trained_student

    start = time.time()
    cfg = config_from_dict(run_config(cell, budget, teacher_dir, prep, data_root, train_dir))
    out = Path(cfg.output_dir)
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    if summary is None or not summary.get("student_weights"):
        summary = train(cfg, resume=has_checkpoint(out))
    t_train = time.time() - start
    student = load_trained_student(
        cfg.student.spec, cfg.student.text, summary["student_weights"], prep["teacher"]
    )
    metrics = evaluate(student, data_root)
    losses = cfg.to_dict()["losses"]
    if (
        cfg.optim.groups
    ):  # the records keep the recipe's group overrides beside its terms, as before optim.groups
        losses["groups"] = cfg.optim.groups
    record = {
        "cell": asdict(cell),
        "budget": asdict(budget),
        "losses": losses,
        "metrics": metrics,
        "train_seconds": round(summary.get("seconds", t_train), 1),
        "eval_seconds": round(time.time() - start - t_train, 1),
        "images_per_s": summary.get("images_per_s"),
        "skipped": summary.get("skipped"),
        "final_loss": summary.get("final", {}).get("loss"),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": {
            k: v
            for k, v in cfg.to_dict()["data"].items()
            if k in ("train", "unpaired", "unpaired_batch_size", "filter", "texts", "text_batch_size")
        },
        "teacher": prep["teacher"].fingerprint(),
        "unpaired_samples": summary.get("unpaired_samples"),
    }
    layout.write_json((folder or layout.cells_dir(budget)) / f"{cell.name}.json", record)
    return record
