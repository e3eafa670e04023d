"""Statistics over finished cells: per-cell scores, mean and std per (track, setting, method), retention
of the teacher's figures, the dev-only selection of our variant, the paired relational margin, the cells
that bring a close margin to 5 seeds, and the budget study."""

from __future__ import annotations

import json
import statistics

from . import layout
from .grid import B2N_KEY, METHODS, PROBE_KEY, RETRIEVAL, ZEROSHOT, Cell
from .teachers import cell_teacher, one_teacher, teacher_figures

CONFIRM_SEEDS = (0, 1, 2)  # a screened variant is confirmed on the dev mean over these seeds
MIN_SEEDS = 3  # paired seeds a margin needs before it can count as a win
CLOSE_SEEDS = (3, 4)  # issue 6: "at least 3 seeds; 5 where differences are close"


def metric_value(metrics: dict, dataset: str, name: str) -> float | None:
    value = metrics.get(dataset, {}).get(name)
    return None if value is None else 100.0 * value


def scores(metrics: dict) -> dict:
    """Per-cell figures in percent: every tracked metric, the zero-shot mean (top-1 of the 4 sets), the
    retrieval mean (6 recalls) and the benchmark score (their mean)."""
    row = {f"{d} {m}": metric_value(metrics, d, m) for d, m in ZEROSHOT + RETRIEVAL}
    zs = [row[f"{d} acc1"] for d, m in ZEROSHOT if m == "acc1"]
    rt = [row[f"{d} {m}"] for d, m in RETRIEVAL]
    row["zero-shot mean"] = sum(zs) / len(zs)
    row["retrieval mean"] = sum(rt) / len(rt)
    row["score"] = (row["zero-shot mean"] + row["retrieval mean"]) / 2
    dev = [metric_value(metrics, "flickr8k-dev", m) for _, m in RETRIEVAL]
    row["dev retrieval mean"] = sum(dev) / len(dev) if all(v is not None for v in dev) else None
    row["linear probe"] = metric_value(metrics, PROBE_KEY, "acc1")
    for name in ("base_acc1", "novel_acc1", "hm"):
        row[f"b2n {name}"] = metric_value(metrics, B2N_KEY, name)
    return row


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(
    records: list[dict],
    teacher: dict | None = None,
    teachers: dict[str, dict] | None = None,
    aliases: dict[str, str] | None = None,
) -> dict:
    """Rows per (track, setting, method) with mean/std/retention, each (track, setting) from the cells of
    one teacher (`one_teacher`; `aliases` map a rebuilt teacher to the one it was measured interchangeable
    with); `teacher` (metrics) or `teachers` (fingerprint -> metrics) give the teacher rows."""
    records, dropped = one_teacher(records, aliases)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        c = r["cell"]
        groups.setdefault((c["track"], c["setting"], c["method"]), []).append(r)
    fallback = scores(teacher) if teacher else None
    teacher_rows: dict[str, dict | None] = {}
    raw: dict[str, dict[str, int]] = {}
    for r in records:
        per, fp = raw.setdefault(f"{r['cell']['track']}/{r['cell']['setting']}", {}), cell_teacher(r)
        per[fp] = per.get(fp, 0) + 1
    for (
        key,
        per,
    ) in raw.items():  # the figures of the teacher most of the table's cells recorded, where measured
        known = [fp for fp in sorted(per, key=lambda fp: (-per[fp], fp)) if teachers and fp in teachers]
        fp = known[0] if known else cell_teacher({"teacher": next(iter(per))}, aliases)
        teacher_rows[key] = (
            scores(teacher_figures(fp, teachers, aliases)) if teachers and fp in teachers else fallback
        )
    rows = []
    order = list(METHODS)
    for (track, setting, method), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))
    ):
        per_seed = [scores(r["metrics"]) for r in rs]
        row = {
            "track": track,
            "setting": setting,
            "method": method,
            "seeds": sorted(r["cell"]["seed"] for r in rs),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
            "metrics": {},
            "teacher": sorted({cell_teacher(r) for r in rs}),  # as recorded, aliases not applied
        }
        teacher_row = teacher_rows.get(f"{track}/{setting}")
        for key in per_seed[0]:
            vals = [p[key] for p in per_seed if p[key] is not None]
            if vals:
                m, s = mean_std(vals)
                ret = 100 * m / teacher_row[key] if teacher_row and teacher_row.get(key) else None
                row["metrics"][key] = {"mean": m, "std": s, "retention": ret, "n": len(vals)}
        rows.append(row)
    margins, by_metric, iteration = {}, {}, {}
    for track, setting in sorted(
        {(r["track"], r["setting"]) for r in rows}
    ):  # a stable order in methods.json
        mine = [r for r in records if (r["cell"]["track"], r["cell"]["setting"]) == (track, setting)]
        key = f"{track}/{setting}"
        margins[key] = relational_margin(mine)
        ours = margins[key]["ours"] if margins[key] else None
        by_metric[key] = (
            {k: relational_margin(mine, k, ours) for k in ("zero-shot mean", "retrieval mean")}
            if ours
            else {}
        )
        iteration[key] = {
            "selected": select_relational(mine),
            "seed0": [_seed0(r) for r in mine if _screened(r)],
        }
    return {
        "rows": rows,
        "teacher": fallback,
        "teachers": teacher_rows,
        "margins": margins,
        "margins_by_metric": by_metric,
        "iteration": iteration,
        "left_out": dropped,
    }


def _screened(record: dict) -> bool:
    """A seed-0 cell of ours (the default or a variant): a row of the iteration table."""
    return record["cell"]["method"].startswith("relational") and record["cell"]["seed"] == 0


def _seed0(record: dict) -> dict:
    losses = record["losses"]
    figures = scores(record["metrics"])
    return {
        "method": record["cell"]["method"],
        "options": losses.get("relational") if isinstance(losses, dict) else None,
        **{k: figures[k] for k in ("dev retrieval mean", "zero-shot mean", "retrieval mean", "score")},
    }


def select_relational(records: list[dict]) -> str | None:
    """Our variant by Flickr8k dev retrieval mean (dev is the only selection figure): among the variants run
    at every seed of CONFIRM_SEEDS, the best dev mean over those seeds; with none confirmed yet, the best
    dev at seed 0 (the screen). A variant that only led the seed-0 screen never displaces a confirmed one:
    the seed-to-seed spread of dev (about 0.5 points) is as large as the screen's gaps."""
    dev: dict[str, dict[int, float]] = {}
    for r in records:
        value = scores(r["metrics"])["dev retrieval mean"]
        if r["cell"]["method"].startswith("relational") and value is not None:
            dev.setdefault(r["cell"]["method"], {})[r["cell"]["seed"]] = value
    confirmed = {
        m: statistics.fmean(v[s] for s in CONFIRM_SEEDS)
        for m, v in dev.items()
        if set(CONFIRM_SEEDS) <= set(v)
    }
    ranked = confirmed or {m: v[0] for m, v in dev.items() if 0 in v}
    return max(sorted(ranked), key=ranked.__getitem__) if ranked else None


def scores_by_method(records: list[dict], key: str = "score") -> dict[str, dict[int, float]]:
    """Method -> seed -> `key` of its cell."""
    by_method: dict[str, dict[int, float]] = {}
    for r in records:
        by_method.setdefault(r["cell"]["method"], {})[r["cell"]["seed"]] = scores(r["metrics"])[key]
    return by_method


def rank_published(by_method: dict[str, dict[int, float]]) -> list[str]:
    """The published methods of `by_method`, best mean first (ties keep their order)."""
    published = [m for m in by_method if METHODS[m].published]
    return sorted(published, key=lambda m: -statistics.fmean(by_method[m].values()))


def relational_margin(records: list[dict], key: str = "score", ours: str | None = None) -> dict | None:
    """Ours (default: the dev-selected variant with the most seeds) minus the best published method
    (highest mean `key`), paired by seed: {mean, std, over, ours, seeds, wins}."""
    by_method = scores_by_method(records, key)
    if ours is None:
        selected = select_relational(records)
        ours = (
            selected
            if selected and len(by_method.get(selected, {})) >= len(by_method.get("relational", {}))
            else "relational"
        )
    if ours not in by_method:
        return None
    ranking = rank_published(by_method)
    if not ranking:
        return None
    best = ranking[0]
    return paired_margin(ours, by_method[ours], best, by_method[best], metric=key)


def paired_margin(
    ours: str, mine: dict[int, float], best: str, theirs: dict[int, float], **extra
) -> dict | None:
    """`mine` - `theirs` (seed -> score, in points) over their common seeds: {mean, std, over, ours, seeds,
    **extra, wins}, or None when they share no seed."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    m, s = mean_std([mine[k] - theirs[k] for k in seeds])
    # a win needs the spread of at least MIN_SEEDS paired seeds (issue 6): one seed has no std to beat
    return {
        "mean": round(m, 3),
        "std": round(s, 3),
        "over": best,
        "ours": ours,
        "seeds": seeds,
        **extra,
        "wins": bool(len(seeds) >= MIN_SEEDS and m - 2 * s >= 1.0),
    }


def close_cells(
    records: list[dict],
    rivals: int = 2,
    base: tuple[int, ...] = (0, 1, 2),
    extra: tuple[int, ...] = CLOSE_SEEDS,
) -> list[Cell]:
    """The cells that bring a close comparison to 5 seeds: for each (track, setting) whose margin over
    `base` seeds is undecided (neither a win nor a loss by the criterion: |margin| - 2 std < 1 point), our
    selected variant and the `rivals` best published methods by mean score over `base`, at the `extra` seeds.
    The choice reads only seeds in `base`, so adding the extra seeds never changes it."""
    tables: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["cell"]["seed"] in base:
            tables.setdefault((r["cell"]["track"], r["cell"]["setting"]), []).append(r)
    out = []
    for (track, setting), mine in sorted(tables.items()):
        margin = relational_margin(mine)
        if (
            margin is None
            or len(margin["seeds"]) < len(base)
            or abs(margin["mean"]) - 2 * margin["std"] >= 1.0
        ):
            continue
        best = rank_published(scores_by_method(mine))[:rivals]
        out += [Cell(m, track, setting, seed) for m in [margin["ours"], *best] for seed in extra]
    return out


def budget_study(main: list[dict]) -> list[dict]:
    """Every other budget's cells beside the main grid's cells of the same (method, track, setting, seed):
    per budget and track, each method's score, zero-shot and retrieval means at both budgets (those seeds
    only) and our margin over the best published method at each budget."""
    base = {Cell(**r["cell"]): r for r in main}
    out = []
    for folder in sorted(p for p in layout.BUDGETS.glob("*") if p.is_dir()):
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        by_budget: dict[tuple, list[dict]] = {}
        for r in records:
            if Cell(**r["cell"]) in base:
                key = (json.dumps(r["budget"], sort_keys=True), r["cell"]["track"], r["cell"]["setting"])
                by_budget.setdefault(key, []).append(r)
        for (b, track, setting), rs in sorted(by_budget.items()):
            pairs = [(base[Cell(**r["cell"])], r) for r in rs]
            out.append(
                {
                    "budget": json.loads(b),
                    "track": track,
                    "setting": setting,
                    "rows": _budget_rows(pairs),
                    "margin_base": relational_margin([a for a, _ in pairs]),
                    "margin_long": relational_margin([r for _, r in pairs]),
                }
            )
    return out


def _budget_rows(pairs: list[tuple[dict, dict]]) -> list[dict]:
    """Per method (grid order): its seeds and mean ± std of each figure at the main budget and the other."""
    figures = [(scores(a["metrics"]), scores(r["metrics"])) for a, r in pairs]
    rows = []
    for method in sorted({r["cell"]["method"] for _, r in pairs}, key=list(METHODS).index):
        mine = [(f, r["cell"]["seed"]) for f, (_, r) in zip(figures, pairs) if r["cell"]["method"] == method]
        row = {"method": method, "seeds": sorted(seed for _, seed in mine)}
        for key in ("zero-shot mean", "retrieval mean", "score"):
            for tag, side in (("base", 0), ("long", 1)):
                row[f"{key} {tag}"] = mean_std([f[side][key] for f, _ in mine])
        rows.append(row)
    return rows
