"""CPU latency of encoders in PyTorch and ONNX Runtime (issue "Students").

For each model and tower: median wall time of one forward at each batch size after warm-up, with the
thread count fixed for both runtimes, throughput (samples/s) at the largest batch, parameters and
FLOPs (`count_params_flops`). `pareto_plot` puts zero-shot accuracy from CLIP_benchmark-style result
JSONs against image latency.

Waiting policy: on a CPU shared with other jobs, spinning worker threads (OpenMP's default, ONNX
Runtime's default) wait on descheduled siblings at every op and inflate medians by 10-50x. With
`OMP_WAIT_POLICY=PASSIVE` in the environment (it must be set before torch is imported), ONNX Runtime's
workers are told not to spin either, so both runtimes run under the same policy.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from clipdistill.paths import atomic_path

log = logging.getLogger(__name__)

CAPTION = "a photo of a small dog running on the grass."


def _time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """(median, min) wall time of `fn` in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times), 1000.0 * min(times)


def bench_latency(
    specs: Iterable[str],
    threads: int = 2,
    batch_sizes: Iterable[int] = (1, 64),
    *,
    warmup: int = 2,
    repeats: int = 10,
    repeats_large: int = 3,
    onnx: bool = True,
    towers: Iterable[str] = ("image", "text"),
) -> list[dict]:
    """One row per (model, tower): params, flops, median `torch_ms_b{B}` / `onnx_ms_b{B}` (and the minima
    `*_min_ms_b{B}`), throughput `torch_per_s` / `onnx_per_s` at the largest batch.

    Batches above 1 use `repeats_large` timed runs (they are long on a small CPU) after one warm-up.
    """
    from tqdm import tqdm

    settings = dict(
        batch_sizes=sorted({int(b) for b in batch_sizes}),
        warmup=warmup,
        repeats=repeats,
        repeats_large=repeats_large,
        onnx=onnx,
        towers=list(towers),
        threads=threads,
    )
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict] = []
    try:
        # delay: no bar line before an error in the first model's build (a bad spec is one line on stderr)
        for spec in tqdm(list(specs), desc="latency", unit="model", delay=5):
            rows += _bench_model(spec, **settings)
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _bench_model(spec: str, **settings) -> list[dict]:
    from clipdistill.models.factory import create_model

    return bench_loaded(create_model(spec), spec, **settings)


def bench_loaded(
    model,
    spec: str,
    *,
    batch_sizes: list[int],
    warmup: int,
    repeats: int,
    repeats_large: int,
    onnx: bool,
    towers: list[str],
    threads: int,
    spinning: bool | None = None,
) -> list[dict]:
    """`bench_latency`'s rows for a model already built (`spec` labels the rows); the caller sets threads.
    `spinning`: whether ONNX Runtime's idle workers spin (its default); None: not under OMP_WAIT_POLICY=PASSIVE."""
    from clipdistill.models.export import IMAGE_ONNX, TEXT_ONNX, export_onnx, inference_ready, onnx_session
    from clipdistill.models.students import count_params_flops

    size = model.image_config.size
    inputs = {
        (tower, bs): torch.randn(bs, 3, size, size) if tower == "image" else model.tokenize([CAPTION] * bs)
        for tower in towers
        for bs in batch_sizes
    }
    with inference_ready(model), tempfile.TemporaryDirectory(prefix="clipdistill-onnx-") as tmp:
        cost = count_params_flops(model)
        rows = {tower: {"model": spec, "tower": tower, **cost[tower], "image_size": size} for tower in towers}
        # PyTorch first: ONNX Runtime's worker threads spin after each run and would steal its cores.
        with torch.inference_mode():
            for (tower, bs), x in inputs.items():
                encode = model.image_features if tower == "image" else model.text_features
                w, r = (warmup, repeats) if bs == 1 else (1, repeats_large)
                rows[tower][f"torch_ms_b{bs}"], rows[tower][f"torch_min_ms_b{bs}"] = _time_ms(
                    functools.partial(encode, x), w, r
                )
        if onnx:
            export_onnx(model, tmp, verify=False)
            for tower in towers:
                path = Path(tmp) / (IMAGE_ONNX if tower == "image" else TEXT_ONNX)
                session = onnx_session(
                    path, threads, spinning=not passive_waiting() if spinning is None else spinning
                )
                for bs in batch_sizes:
                    feed = {"image" if tower == "image" else "tokens": inputs[tower, bs].numpy()}
                    w, r = (warmup, repeats) if bs == 1 else (1, repeats_large)
                    rows[tower][f"onnx_ms_b{bs}"], rows[tower][f"onnx_min_ms_b{bs}"] = _time_ms(
                        functools.partial(session.run, None, feed), w, r
                    )
                del session
    top = batch_sizes[-1]
    for row in rows.values():
        for runtime in ("torch", "onnx"):
            if f"{runtime}_ms_b{top}" in row:
                row[f"{runtime}_per_s"] = 1000.0 * top / row[f"{runtime}_ms_b{top}"]
        log.info(
            "%s %s: %s",
            spec,
            row["tower"],
            {k: round(v, 2) for k, v in row.items() if k.endswith(("_ms_b1", "_per_s"))},
        )
    return list(rows.values())


def passive_waiting() -> bool:
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def environment(threads: int) -> dict:
    import onnxruntime

    return {
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)"),
        "load_average": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def latency_table(rows: list[dict]) -> str:
    """Markdown table: per model and tower, params (M), GFLOPs, latency "median (min)" per batch size and
    throughput (from the median) at the largest batch."""
    batches = sorted({int(k.rsplit("_b", 1)[1]) for r in rows for k in r if k.startswith("torch_ms_b")})
    head = ["model", "tower", "params (M)", "GFLOPs"]
    for label in ("PyTorch", "ORT"):
        head += [f"{label} b{b} ms" for b in batches] + [f"{label} /s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["tower"], f"{r['params'] / 1e6:.2f}", f"{r['flops'] / 1e9:.2f}"]
        for runtime in ("torch", "onnx"):
            for b in batches:
                med, low = r.get(f"{runtime}_ms_b{b}"), r.get(f"{runtime}_min_ms_b{b}")
                cells.append("-" if med is None else f"{med:.1f}" + ("" if low is None else f" ({low:.1f})"))
            cells.append(f"{r[f'{runtime}_per_s']:.0f}" if f"{runtime}_per_s" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def load_results(paths: Iterable[str | Path], metric: str = "acc1") -> dict[str, dict[str, float]]:
    """{model spec: {dataset: metric}} from zero-shot classification result JSONs (CLIP_benchmark format)."""
    out: dict[str, dict[str, float]] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        if data.get("task") != "zeroshot_classification" or metric not in data.get("metrics", {}):
            continue
        out.setdefault(str(data["model"]), {})[str(data["dataset"])] = float(data["metrics"][metric])
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(
    rows: list[dict], results: dict[str, dict[str, float]], out: str | Path, metric: str = "acc1"
) -> int:
    """PNG of mean zero-shot `metric` (%) over datasets vs image latency at batch 1; returns points plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, names = [], []
    for r in rows:
        if r["tower"] != "image" or r["model"] not in results:
            continue
        latency = r.get("onnx_ms_b1", r.get("torch_ms_b1"))
        scores = results[r["model"]]
        points.append((latency, 100.0 * statistics.mean(scores.values())))
        names.append(r["model"])
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for (x, y), name in zip(points, names):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(points)
        ax.plot(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            "--",
            color="gray",
            label="Pareto front",
        )
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("image encoder latency, batch 1 (ms, ONNX Runtime where measured)")
    ax.set_ylabel(f"zero-shot {metric} (%), mean over datasets")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(out)
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return len(points)
