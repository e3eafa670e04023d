"""`clipdistill teacher build|check`: the composed offline teacher."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipdistill.errors import UserError


def _dataset_arg(value: str, data_root: str | None) -> tuple[str, str | None]:
    """`--data` takes a dataset name under the data root, or a dataset folder path."""
    path = Path(value)
    if (path / "dataset_type.txt").exists():
        return path.name, str(path.parent)
    if "/" in value or path.exists():
        raise UserError(
            f"'{value}' is not a dataset folder (no dataset_type.txt); pass a folder like shared/data/flickr8k"
        )
    return value, data_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="build or check the composed offline teacher")
    tsub = p.add_subparsers(dest="teacher_command", metavar="ACTION", required=True)

    b = tsub.add_parser(
        "build",
        help="align the locked EfficientNet-Lite2 and MiniLM towers LiT-style on image-caption shards",
    )
    b.add_argument(
        "--data", default="flickr8k", help="image-caption dataset name or folder (default: flickr8k)"
    )
    b.add_argument(
        "--data-root", default=None, help="datasets folder (default: $CLIPDISTILL_DATA or ../shared/data)"
    )
    b.add_argument("--out", required=True, help="output directory (loaded later as teacher:DIR)")
    b.add_argument("--epochs", type=int, default=None)
    b.add_argument("--text-unlocked", type=int, default=None, help="train the last N MiniLM layers too")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(handler=_build)

    c = tsub.add_parser(
        "check", help="top-1/top-5 of the image tower's own ImageNet classifier on imagenet-1k-sample"
    )
    c.add_argument("--data-root", default=None)
    c.set_defaults(handler=_check)


def _build(args: argparse.Namespace) -> int:
    from clipdistill.checks import check_output_dir
    from clipdistill.data.shards import dataset_info
    from clipdistill.models.teacher_build import TeacherBuildConfig, build_teacher

    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs {args.epochs} must be >= 1")
    if args.text_unlocked is not None and args.text_unlocked < 0:
        raise UserError(f"--text-unlocked {args.text_unlocked} must be >= 0 (MiniLM layers to train)")
    dataset, root = _dataset_arg(args.data, args.data_root)
    cfg = TeacherBuildConfig(dataset=dataset, seed=args.seed)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.text_unlocked is not None:
        cfg.text_unlocked = args.text_unlocked
    info = dataset_info(dataset, root)
    if info.kind != "retrieval":
        raise UserError(
            f"--data {args.data} is a {info.kind} dataset; the teacher is aligned on image-caption pairs "
            "(a retrieval dataset such as flickr8k)"
        )
    info.shards(cfg.train_split)
    info.shards(cfg.dev_split)
    check_output_dir(args.out, "--out")
    record = build_teacher(cfg, args.out, root)
    best = record["best_epoch"]
    print(
        f"teacher saved to {args.out}: best dev epoch {best['epoch']}, dev R@1 i2t {100 * best['dev_i2t_r1']:.1f} "
        f"t2i {100 * best['dev_t2i_r1']:.1f}, {record['seconds']:.0f} s"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from clipdistill.models.composed import ComposedTeacher
    from clipdistill.models.teacher_build import check_image_tower

    print(json.dumps(check_image_tower(ComposedTeacher(), args.data_root), indent=2))
    return 0
