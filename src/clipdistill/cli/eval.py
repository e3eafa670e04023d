"""`clipdistill eval` (one model, one dataset, one task) and `clipdistill compare` (a table of records)."""

from __future__ import annotations

import argparse
import glob

from clipdistill.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="zero-shot classification/retrieval, base-to-novel or linear probe of a model",
        description="Evaluate a model on one dataset split; prints a table, optionally writes "
        "a CLIP_benchmark-style JSON record.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model spec, e.g. openclip:ViT-B-32/TAG, hf:DIR, teacher:DIR, student:NAME",
    )
    p.add_argument(
        "--dataset", required=True, help="dataset name under the data root (e.g. cifar10, flickr8k)"
    )
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument(
        "--task",
        default=None,
        help="zeroshot_classification, zeroshot_retrieval, base2novel or linear_probe "
        "(default: from the dataset's dataset_type.txt)",
    )
    p.add_argument("--every", type=int, default=1, help="evaluate every N-th sample only (default: 1, all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--data-root", default=None, help="datasets folder (default: $CLIPDISTILL_DATA or ../shared/data)"
    )
    p.add_argument("--output", default=None, help="write the JSON record to this file")
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="base2novel: random base/novel class split with this seed (default: first half = base)",
    )
    p.add_argument("--train-split", default="train", help="linear_probe: the split the probe is fitted on")
    p.add_argument(
        "--train-every",
        type=int,
        default=None,
        help="linear_probe: subsample the train split (default: --every)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--no-cache", action="store_true", help="neither read nor write cached text embeddings/features"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_eval)

    c = sub.add_parser(
        "compare",
        help="markdown table of evaluation records across models and datasets",
        description="Print a markdown table (models x datasets, percent) of JSON records "
        "written by `clipdistill eval --output`.",
    )
    c.add_argument("results", nargs="+", help="result JSON files (globs are expanded)")
    c.add_argument("--all", action="store_true", help="every metric, not only the headline ones")
    c.set_defaults(handler=_compare)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from clipdistill.eval.report import format_record
    from clipdistill.eval.runner import evaluate

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    record = evaluate(
        args.model,
        args.dataset,
        args.split,
        args.task,
        data_root=args.data_root,
        every=args.every,
        batch_size=args.batch_size,
        split_seed=args.split_seed,
        train_split=args.train_split,
        train_every=args.train_every,
        cache=not args.no_cache,
        progress=not args.quiet,
        output=args.output,
    )
    print(format_record(record), end="")
    if args.output:
        print(f"\nrecord written to {args.output}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from clipdistill.eval.report import compare
    from clipdistill.eval.runner import load_records

    paths = [p for pattern in args.results for p in (sorted(glob.glob(pattern)) or [pattern])]
    print(compare(load_records(paths), all_metrics=args.all), end="")
    return 0
