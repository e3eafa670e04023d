"""`clipdistill data get|list`: fetch CLIP_benchmark sets from the Hugging Face Hub, show what is local."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from clipdistill.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="fetch CLIP_benchmark datasets from the Hugging Face Hub, list local ones"
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    g = dsub.add_parser(
        "get",
        help="download clip-benchmark/wds_NAME into the data root (resumable, only the requested splits)",
        description="Download CLIP_benchmark webdataset sets. NAME is a local name (imagenet-1k-sample) or a "
        "CLIP_benchmark name (imagenet1k); `clipdistill data list` shows both. Writes into --root, else "
        "$CLIPDISTILL_DATA, else ~/.cache/clipdistill/data ($CLIPDISTILL_CACHE/data). An interrupted download "
        "resumes on the next call; nothing appears under the dataset's name until its splits are complete.",
    )
    g.add_argument("names", nargs="+", metavar="NAME")
    g.add_argument(
        "--splits",
        default=None,
        metavar="test,train",
        help="comma-separated splits (default: the splits the toolkit uses for each set)",
    )
    g.add_argument("--root", default=None, help="data root to write into")
    g.set_defaults(handler=_get)

    ls = dsub.add_parser(
        "list", help="datasets under the data root (type, splits, sample counts) and the names to fetch"
    )
    ls.add_argument(
        "--root",
        default=None,
        help="data root (default: $CLIPDISTILL_DATA, ../shared/data, ~/.cache/clipdistill/data)",
    )
    ls.set_defaults(handler=_list)


def _get(args: argparse.Namespace) -> int:
    from clipdistill.checks import check_output_dir
    from clipdistill.data.hub import get_dataset, resolve
    from clipdistill.paths import fetch_root

    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    for name in args.names:
        resolve(name)  # refuse a typo before downloading anything
    for split in (
        splits or []
    ):  # a split is a folder of the Hub repo: a glob or a path would fetch other files
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", split):
            raise UserError(f"--splits: '{split}' is not a split name; pass plain names such as test,train")
    check_output_dir(fetch_root(args.root), "--root" if args.root else "data root")
    for name in args.names:
        result = get_dataset(name, splits, args.root)
        done = [f"{s} (new)" for s in result.added] + [
            f"{s} (already local)" for s in result.kept if s not in result.added
        ]
        print(f"{result.name} <- {result.repo_id}: {', '.join(done)} in {result.folder}")
        if result.dev_split:
            d = result.dev_split
            print(
                f"  dev: {d['dev_samples']} samples drawn from train with seed {d['seed']} (the Hub set has no dev "
                f"split); train keeps {d['train_samples']}; recorded in {result.folder / 'dev_split.json'}"
            )
    return 0


def _list(args: argparse.Namespace) -> int:
    from clipdistill.data.hub import DATASETS, local_datasets

    if args.root is not None and not Path(args.root).expanduser().is_dir():
        raise UserError(f"--root '{args.root}' is not a folder; pass an existing data root, or omit --root")
    root, found = local_datasets(args.root)
    print(f"data root: {root}" + ("" if root.is_dir() else " (does not exist)"))
    if found:
        print("\n| dataset | type | splits (samples) | source |\n|---|---|---|---|")
        for d in found:
            splits = ", ".join(
                f"{s} ({samples:,} in {shards} shards)" for s, (shards, samples) in d.splits.items()
            )
            print(f"| {d.name} | {d.kind} | {splits or '-'} | {d.source or 'local copy'} |")
    else:
        print("no datasets here")
    print("\nfetchable with `clipdistill data get NAME` (NAME: local or CLIP_benchmark name):\n")
    print("| local name | CLIP_benchmark name | type | default splits | note |\n|---|---|---|---|---|")
    for d in DATASETS.values():
        print(f"| {d.local} | {d.hub} | {d.kind} | {','.join(d.splits)} | {d.note} |")
    return 0
