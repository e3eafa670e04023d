"""Tables, JSON and the Pareto plot of `benchmarks/students.py` from its cell files (no training here)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

FIGURES = ("cifar10", "cifar100-916", "flickr8k_ret_mean", "imagenet_top5")
SOURCES = {
    "cifar10": ("cifar10", "acc1"),
    "cifar100-916": ("cifar100-916", "acc1"),
    "imagenet_top5": ("imagenet-1k-sample", "acc5"),
    "flickr8k_ret_mean": ("flickr8k", "ret_mean"),
}
LABELS = {
    "cifar10": "CIFAR-10 top-1",
    "cifar100-916": "cifar100-916 top-1",
    "flickr8k_ret_mean": "Flickr8k Ret mean",
    "imagenet_top5": "IN-1k-sample top-5",
}
CHANCE = {"dtd-10": ("acc1", 1 / 47), "mnist": ("acc1", 1 / 10)}
README_START, README_END = "<!-- students summary -->", "<!-- /students summary -->"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _retention(cells: list[dict], teacher: dict) -> tuple[dict, dict, dict]:
    """Per figure: mean and std over seeds of student / teacher, and the mean figure in percent."""
    retention, retention_std, absolute = {}, {}, {}
    for fig in FIGURES:
        ds, metric = SOURCES[fig]
        ratios = [c["metrics"][ds][metric] / teacher[ds][metric] for c in cells]
        retention[fig], retention_std[fig] = (round(v, 4) for v in _mean_std(ratios))
        absolute[fig] = round(100 * statistics.fmean(c["metrics"][ds][metric] for c in cells), 2)
    return retention, retention_std, absolute


def summarise(cells_dir: Path, grid) -> list[dict]:
    teacher = json.loads((cells_dir / "teacher.json").read_text())
    latency = (
        json.loads((cells_dir / "latency.json").read_text())
        if (cells_dir / "latency.json").exists()
        else None
    )
    rows = []
    for st in grid:
        cells = sorted(
            (
                json.loads(p.read_text())
                for p in (cells_dir / "cells").glob(f"{st.name}-f{st.freeze}-s*.json")
                if not p.stem.endswith("-dev")
            ),
            key=lambda c: c["seed"],
        )
        if not cells:
            continue
        retention, retention_std, absolute = _retention(cells, teacher)
        means = [
            statistics.fmean(
                c["metrics"][SOURCES[f][0]][SOURCES[f][1]] / teacher[SOURCES[f][0]][SOURCES[f][1]]
                for f in FIGURES
            )
            for c in cells
        ]
        speed = (latency or {}).get("speedup", {}).get(st.tower, {})
        rows.append(
            {
                "name": st.name,
                "init": st.init,
                "image_size": st.image_size,
                "text": "teacher",
                "freeze": st.freeze,
                "trains": "linear head only"
                if st.head_only
                else f"blocks {st.freeze}-6, conv head, linear head",
                "speedup_ort": round(speed["onnx"], 2) if speed else None,
                "speedup_torch": round(speed["torch"], 2) if speed else None,
                "retention": retention,
                "retention_std": retention_std,
                "retention_mean": round(statistics.fmean(means), 4),
                "retention_mean_std": round(_mean_std(means)[1], 4),
                "percent": absolute,
                "chance_level": {
                    ds: round(100 * statistics.fmean(c["metrics"][ds][m] for c in cells), 1)
                    for ds, (m, _) in CHANCE.items()
                },
                "seeds": [c["seed"] for c in cells],
                "train_minutes": round(statistics.fmean(c["train_minutes"] for c in cells), 1),
                "epochs": st.epochs,
                "trained_on": cells[0]["trained_on"],
            }
        )
    return rows


def summarise_both(cells_dir: Path, image_rows: list[dict]) -> list[dict]:
    """Setting `both`: an inherited MiniLM text tower with an image student (students_both.py); one row
    per (text layers, text epochs, image student), cells named text{L}-e{E}-{image}-s{seed}.json."""
    teacher = json.loads((cells_dir / "teacher.json").read_text())
    lat_file = cells_dir / "both" / "latency.json"
    latency = json.loads(lat_file.read_text()) if lat_file.exists() else {}
    groups: dict[str, list[dict]] = {}
    for p in sorted((cells_dir / "both").glob("text*-e*-s*.json")):
        groups.setdefault(p.stem.rsplit("-s", 1)[0], []).append(json.loads(p.read_text()))
    rows = []
    for group, cells in groups.items():
        cells.sort(key=lambda c: c["seed"])
        text_part, image_name = group.split("-", 2)[:2], group.split("-", 2)[2]
        n = text_part[0].removeprefix("text")
        image = next((r for r in image_rows if r["name"] == image_name), None)
        retention, retention_std, absolute = _retention(cells, teacher)
        text_speed = latency.get(n, {})
        means = [
            statistics.fmean(
                c["metrics"][SOURCES[f][0]][SOURCES[f][1]] / teacher[SOURCES[f][0]][SOURCES[f][1]]
                for f in FIGURES
            )
            for c in cells
        ]
        rows.append(
            {
                "name": f"{image_name} + minilm-l{n} (inherited, {text_part[1]})",
                "init": f"{image['init'] if image else '?'} image, inherited text",
                "image_size": image["image_size"] if image else None,
                "text": "own",
                "text_layers": int(n),
                "text_epochs": cells[0]["epochs"],
                "text_speedup_torch_b1_32tok": round(text_speed["speedup_torch"], 2) if text_speed else None,
                "text_speedup_ort_b1_32tok": round(text_speed["speedup_onnx"], 2)
                if "speedup_onnx" in text_speed
                else None,
                "speedup_ort": image["speedup_ort"] if image else None,
                "speedup_torch": image["speedup_torch"] if image else None,
                "retention": retention,
                "retention_std": retention_std,
                "retention_mean": round(statistics.fmean(means), 4),
                "retention_mean_std": round(_mean_std(means)[1], 4),
                "percent": absolute,
                "seeds": [c["seed"] for c in cells],
                "chance_level": {
                    ds: round(100 * statistics.fmean(c["metrics"][ds][m] for c in cells), 1)
                    for ds, (m, _) in CHANCE.items()
                },
                "train_minutes": round(statistics.fmean(c["train"]["seconds"] for c in cells) / 60, 1),
                "trained_on": {
                    "texts": "flickr8k:train captions",
                    "image_tower": f"{image_name} of the same seed",
                },
            }
        )
    return rows


def teacher_row(cells_dir: Path) -> dict:
    t = json.loads((cells_dir / "teacher.json").read_text())
    return {f: round(100 * t[SOURCES[f][0]][SOURCES[f][1]], 2) for f in FIGURES} | {
        ds: round(100 * t[ds][m], 1) for ds, (m, _) in CHANCE.items()
    }


def table(rows: list[dict], teacher: dict) -> str:
    head = [
        "student",
        "init",
        "px",
        "speed ORT / torch",
        *[LABELS[f] for f in FIGURES],
        "mean retention",
        "seeds",
        "train min",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(
        "| teacher (Lite2 260 px) | - | 260 | 1x / 1x | "
        + " | ".join(f"{teacher[f]:.1f}" for f in FIGURES)
        + " | 100% | - | - |"
    )
    for r in rows:
        speed = f"{r['speedup_ort']:.1f}x / {r['speedup_torch']:.1f}x" if r["speedup_ort"] else "-"
        one = len(r["seeds"]) == 1  # no spread from one seed: say so instead of printing ± 0
        cells = [
            f"{r['percent'][f]:.1f} ({100 * r['retention'][f]:.1f}%)"
            if one
            else f"{r['percent'][f]:.1f} ({100 * r['retention'][f]:.1f} ± {100 * r['retention_std'][f]:.1f}%)"
            for f in FIGURES
        ]
        mean = (
            f"{100 * r['retention_mean']:.1f}% (one seed)"
            if one
            else f"{100 * r['retention_mean']:.1f} ± {100 * r['retention_mean_std']:.1f}%"
        )
        lines.append(
            f"| {r['name']} | {r['init']} | {r['image_size']} | {speed} | "
            + " | ".join(cells)
            + f" | {mean} | {len(r['seeds'])} | {r['train_minutes']} |"
        )
    return "\n".join(lines)


def chance_table(rows: list[dict], teacher: dict) -> str:
    lines = [
        "| model | DTD-10 top-1 (chance 2.1) | MNIST top-1 (chance 10) |",
        "|---|---|---|",
        f"| teacher | {teacher['dtd-10']} | {teacher['mnist']} |",
    ]
    lines += [f"| {r['name']} | {r['chance_level']['dtd-10']} | {r['chance_level']['mnist']} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for r in rows:
        if not r["speedup_ort"]:
            continue
        marker = "s" if r["init"] == "random" else ("^" if "head" in r["name"] else "o")
        ax.errorbar(
            r["speedup_ort"],
            100 * r["retention_mean"],
            yerr=100 * r["retention_mean_std"],
            fmt=marker,
            capsize=3,
        )
        ax.annotate(
            r["name"],
            (r["speedup_ort"], 100 * r["retention_mean"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("batch-1 speed vs teacher image tower (ONNX Runtime, 2 threads)")
    ax.set_ylabel("mean retention of the teacher (%)")
    ax.set_title("Students (image tower + teacher's text tower)")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)


def render(cells_dir: Path, results: Path, grid) -> None:
    rows = summarise(cells_dir, grid)
    both = summarise_both(cells_dir, rows) if (cells_dir / "both").exists() else []
    teacher = teacher_row(cells_dir)
    md = table(rows, teacher)
    if both:
        md += "\n\nSetting `both` (the student's own text tower: MiniLM-L6's every k-th layer and the teacher's text head, trained on Flickr8k train captions; the image speed is the image student's):\n\n"
        lines = table(both, teacher).split("\n")
        md += "\n".join(lines[:2] + lines[3:])  # the teacher's row is the one above
        speeds = {
            r["text_layers"]: (r["text_speedup_ort_b1_32tok"], r["text_speedup_torch_b1_32tok"]) for r in both
        }
        md += (
            "\n\nText tower speed vs MiniLM-L6 (batch 1, 32 tokens, 2 threads, ONNX Runtime / PyTorch): "
            + ", ".join(f"{n} layers {o}x / {t}x" for n, (o, t) in sorted(speeds.items()))
        )
    rows = rows + both
    full = (
        md
        + "\n\nNear chance for this teacher (reported apart, in no mean; top-1 %):\n\n"
        + chance_table(rows, teacher)
    )
    for name, text in (("students.json", json.dumps(rows, indent=2)), ("students.md", full + "\n")):
        tmp = results / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, results / name)
    plot(rows, results / "students.png")
    readme = results.parent.parent / "README.md"
    text = readme.read_text()
    if README_START in text and README_END in text:
        a, b = text.index(README_START) + len(README_START), text.index(README_END)
        readme.write_text(text[:a] + "\n" + md + "\n" + text[b:])
    print(full)
