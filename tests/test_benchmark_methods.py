"""The side-by-side benchmark's aggregation (benchmarks/methods/): scores, the paired relational
margin, dev-only selection of our variant, and the rendered table, on synthetic cell records."""

from __future__ import annotations

import statistics

import pytest
from helpers.bench import methods_package


@pytest.fixture(scope="module")
def methods():
    with methods_package("bench_methods") as module:
        yield module


def metrics(zs: float, ret: float, dev: float) -> dict:
    """Cell metrics (fractions) whose zero-shot top-1s all equal `zs`, test recalls `ret`, dev recalls `dev`."""
    out = {d: {"acc1": zs, "acc5": zs} for d in ("cifar10", "imagenet-1k-sample", "dtd-10", "mnist")}
    recalls = [f"{d}_retrieval_recall@{k}" for d in ("text", "image") for k in (1, 5, 10)]
    out["flickr8k"] = {r: ret for r in recalls}
    out["flickr8k-dev"] = {r: dev for r in recalls}
    return out


def record(method: str, seed: int, zs: float, ret: float, dev: float = 0.1) -> dict:
    return {
        "cell": {"method": method, "track": "A", "setting": "image", "seed": seed},
        "budget": {},
        "losses": {},
        "metrics": metrics(zs, ret, dev),
        "train_seconds": 1.0,
    }


def test_scores_average_the_four_sets_and_six_recalls(methods):
    m = metrics(0.2, 0.1, 0.05)
    m["mnist"]["acc1"] = 0.6  # zero-shot mean = (20 + 20 + 20 + 60) / 4
    row = methods.scores(m)
    assert row["zero-shot mean"] == pytest.approx(30.0)
    assert row["retrieval mean"] == pytest.approx(10.0)
    assert row["score"] == pytest.approx(20.0)
    assert row["dev retrieval mean"] == pytest.approx(5.0)
    assert row["linear probe"] is None


def test_margin_is_paired_by_seed_against_the_best_published_method(methods):
    ours = [(0.30, 0.10), (0.32, 0.10), (0.31, 0.12)]
    kd = [(0.28, 0.10), (0.28, 0.11), (0.29, 0.10)]  # the better published method by mean score
    crd = [(0.20, 0.10)] * 3
    recs = [record("relational", s, *v) for s, v in enumerate(ours)]
    recs += [record("clip_kd", s, *v) for s, v in enumerate(kd)] + [
        record("clip_kd_crd", s, *v) for s, v in enumerate(crd)
    ]
    recs += [record("no_teacher", s, 0.9, 0.9) for s in range(3)]  # not published: never the reference
    margin = methods.relational_margin(recs)
    diffs = [100 * ((o[0] + o[1]) - (k[0] + k[1])) / 2 for o, k in zip(ours, kd)]
    assert margin["over"] == "clip_kd" and margin["ours"] == "relational" and margin["seeds"] == [0, 1, 2]
    assert margin["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-3)
    assert margin["std"] == pytest.approx(statistics.stdev(diffs), abs=1e-3)
    assert margin["wins"] == (statistics.fmean(diffs) - 2 * statistics.stdev(diffs) >= 1.0)


def test_a_margin_needs_three_seeds_to_win(methods):
    recs = [record("relational", 0, 0.60, 0.60), record("clip_kd", 0, 0.20, 0.20)]  # +40 points at one seed
    margin = methods.relational_margin(recs)
    assert margin["mean"] == pytest.approx(40.0) and margin["std"] == 0.0 and not margin["wins"]
    agg = methods.aggregate(recs, teacher=metrics(0.4, 0.5, 0.5))
    text = methods.markdown(agg, methods.Budget(), latency={})
    assert "+40.00 (one seed) points over seeds [0]: not decided yet" in text and "± 0.00" not in text
    recs += [record("relational", s, 0.60, 0.60) for s in (1, 2)] + [
        record("clip_kd", s, 0.20, 0.20) for s in (1, 2)
    ]
    assert methods.relational_margin(recs)["wins"]


def test_variant_selection_reads_dev_only(methods):
    recs = [
        record("relational", 0, 0.30, 0.30, dev=0.10),
        record("relational_w2", 0, 0.10, 0.10, dev=0.20),
        record("relational_nobank", 0, 0.90, 0.90, dev=0.05),
        record("clip_kd", 0, 0.2, 0.2, dev=0.9),
    ]
    assert methods.select_relational(recs) == "relational_w2"
    # the selected variant is compared only once it has as many seeds as the default
    margin = methods.relational_margin(recs)
    assert margin["ours"] == "relational_w2"
    assert margin["mean"] == pytest.approx(100 * (0.10 - 0.20), abs=1e-3)


def test_markdown_marks_the_best_and_keeps_variants_out_of_the_main_table(methods):
    recs = [record("relational", s, 0.3, 0.3) for s in range(2)] + [
        record("clip_kd", s, 0.2, 0.2) for s in range(2)
    ]
    recs.append(record("relational_cross", 0, 0.1, 0.1, dev=0.01))
    agg = methods.aggregate(recs, teacher=metrics(0.4, 0.5, 0.5))
    text = methods.markdown(agg, methods.Budget(), latency={})
    main = text.split("#### ")[0]
    assert "| relational | 2 | **30.0 ± 0.0**" in main and "| clip_kd | 2 | 20.0 ± 0.0" in main
    assert "relational_cross" not in main
    assert "| relational_cross |" in text  # in the iteration table
    assert "Relational margin (relational)" in text and "+10.00 ± 0.00" in text


def test_summary_is_spliced_between_markers_only(methods, tmp_path):
    recs = [record("relational", s, 0.3, 0.3) for s in range(2)] + [
        record("clip_kd", s, 0.2, 0.2) for s in range(2)
    ]
    agg = methods.aggregate(recs, teacher=metrics(0.4, 0.5, 0.5))
    text = methods.summary_table(agg)
    assert "| relational | 2 | 30.0 ± 0.0 | 30.0 ± 0.0 | 30.0 ± 0.0 |" in text and "+10.00 ± 0.00" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark summary -->\nold\n<!-- /benchmark summary -->\noutro\n")
    methods.layout.splice(readme, "benchmark summary", text)
    methods.layout.splice(readme, "benchmark summary", text)  # idempotent
    content = readme.read_text()
    assert content.startswith("intro\n") and content.endswith("outro\n") and "old" not in content
    assert content.count("| relational | 2 |") == 1
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    methods.layout.splice(plain, "benchmark summary", text)
    assert plain.read_text() == "no markers\n"


def test_teacher_row_follows_each_tracks_teacher(methods):
    a = [record("relational", 0, 0.3, 0.3), record("clip_kd", 0, 0.2, 0.2)]
    b = [
        dict(record("relational", 0, 0.3, 0.3), teacher="new"),
        dict(record("clip_kd", 0, 0.2, 0.2), teacher="new"),
    ]
    for r in b:
        r["cell"] = {**r["cell"], "track": "b2n"}
    agg = methods.aggregate(
        a + b, teachers={methods.LEGACY_TEACHER: metrics(0.4, 0.5, 0.5), "new": metrics(0.6, 0.5, 0.5)}
    )
    assert agg["teachers"]["A/image"]["zero-shot mean"] == pytest.approx(40.0)
    assert agg["teachers"]["b2n/image"]["zero-shot mean"] == pytest.approx(60.0)
    relational_b2n = next(r for r in agg["rows"] if r["track"] == "b2n" and r["method"] == "relational")
    assert relational_b2n["metrics"]["zero-shot mean"]["retention"] == pytest.approx(50.0)


def test_other_budgets_stay_out_of_the_main_grid_and_pair_by_cell(methods, tmp_path, monkeypatch):
    from dataclasses import asdict

    monkeypatch.setattr(methods.layout, "CELLS", tmp_path / "methods")
    monkeypatch.setattr(methods.layout, "BUDGETS", tmp_path / "budgets")
    base, long = methods.Budget(), methods.Budget(steps=256)
    assert methods.cells_dir(base) == tmp_path / "methods"
    assert methods.cells_dir(long) == tmp_path / "budgets" / "vit-t-32-256"
    main = [
        dict(record(m, s, zs, 0.1), budget=asdict(base))
        for m, zs in (("relational", 0.3), ("clip_kd", 0.2))
        for s in range(2)
    ]
    folder = methods.cells_dir(long)
    for m, zs in (("relational", 0.5), ("clip_kd", 0.2), ("tinyclip", 0.9)):  # tinyclip: no main-grid partner
        for s in range(2):
            methods.write_json(
                folder / f"{m}-A-image-s{s}.json", dict(record(m, s, zs, 0.1), budget=asdict(long))
            )
    (study,) = methods.budget_study(main)
    assert study["budget"]["steps"] == 256
    assert [r["method"] for r in study["rows"]] == ["clip_kd", "relational"]
    rel = next(r for r in study["rows"] if r["method"] == "relational")
    assert rel["score base"][0] == pytest.approx(20.0) and rel["score long"][0] == pytest.approx(30.0)
    assert study["margin_base"]["mean"] == pytest.approx(5.0)
    assert study["margin_long"]["mean"] == pytest.approx(15.0)
    text = "\n".join(methods.budget_table([study]))
    assert "64 vs 256 steps" in text and "| relational | 2 | 20.0 ± 0.0 | 30.0 ± 0.0 |" in text
    # a long budget's own report never touches the main grid's files
    monkeypatch.setattr(methods.layout, "RESULTS", tmp_path)
    methods.render_budget(long)
    assert (tmp_path / "budgets" / "vit-t-32-256.md").exists() and not (tmp_path / "methods.json").exists()


def test_a_track_with_only_our_variant_still_renders(methods):
    recs = [record("relational", 0, 0.3, 0.3), record("clip_kd", 0, 0.2, 0.2)]
    lone = record("relational_tau10", 0, 0.1, 0.1)
    lone["cell"] = {**lone["cell"], "setting": "both"}
    agg = methods.aggregate(recs + [lone], teacher=metrics(0.4, 0.5, 0.5))
    assert agg["margins"]["A/both"] is None
    text = methods.markdown(agg, methods.Budget(), latency={})
    assert "### Track A, student setting `both`" in text and "| relational_tau10 | 1 | **10.0 ± 0.0**" in text
    assert "| relational_tau10 | 1 | 10.0 ± 0.0" in methods.summary_table(agg)


def test_a_table_keeps_the_cells_of_one_teacher(methods):
    a = [dict(record(m, s, 0.3, 0.3), teacher="t1") for m in ("relational", "clip_kd") for s in range(2)]
    stray = dict(record("clip_kd", 2, 0.9, 0.9), teacher="t2")  # another teacher: must not reach the rows
    agg = methods.aggregate(a + [stray])
    kd = next(r for r in agg["rows"] if r["method"] == "clip_kd")
    assert kd["seeds"] == [0, 1] and kd["metrics"]["score"]["mean"] == pytest.approx(30.0)
    assert agg["left_out"] == {"A/image": {"t2": 1}}
    assert "Left out: 1 cell(s)" in methods.markdown(agg, methods.Budget(), {})
    # measured interchangeable (t2 -> t1 through a chain t3 -> t2 -> t1): every cell counts
    agg = methods.aggregate(a + [stray], aliases={"t3": "t2", "t2": "t1"})
    kd = next(r for r in agg["rows"] if r["method"] == "clip_kd")
    assert kd["seeds"] == [0, 1, 2] and agg["left_out"] == {}
    assert methods.cell_teacher({"teacher": "t3"}, {"t3": "t2", "t2": "t1"}) == "t1"
    assert methods.cell_teacher({"teacher": "t1"}, {"t1": "t2", "t2": "t1"}) in {"t1", "t2"}  # a cycle ends


def test_compare_records_ignores_the_machine_dependent_probe(methods):
    old, new = record("clip_kd", 0, 0.3, 0.2), record("clip_kd", 0, 0.3, 0.2)
    old["metrics"]["cifar10-linear-probe"] = {"acc1": 0.40}
    new["metrics"]["cifar10-linear-probe"] = {"acc1": 0.41}
    assert methods.compare_records(old, new)["equivalent"]
    new["metrics"]["mnist"]["acc1"] = 0.31  # zero-shot MNIST +1 point, mean +0.25: beyond EQUIV_TOL
    c = methods.compare_records(old, new)
    assert not c["equivalent"] and c["max_abs_diff"] == pytest.approx(1.0)


def test_pair_tracks_uses_only_methods_that_see_no_captionless_image(methods):
    def cell(method, track, seed, teacher, zs):
        r = dict(record(method, seed, zs, 0.2), teacher=teacher)
        r["cell"] = {**r["cell"], "track": track}
        return r

    # comkd uses caption-less images: no evidence
    recs = [
        cell("hinton_kd", "A", 0, "old", 0.3),
        cell("hinton_kd", "b2n", 0, "new", 0.3),
        cell("comkd", "A", 0, "old", 0.3),
        cell("comkd", "b2n", 0, "new", 0.5),
    ]
    found = methods.pair_tracks(recs)
    assert found["new"]["of"] == "old" and found["new"]["cells"] == ["hinton_kd-A/b2n-image-s0"]
    assert found["new"]["equivalent"]
    recs[1]["metrics"]["cifar10"]["acc1"] = 0.35
    assert not methods.pair_tracks(recs)["new"]["equivalent"]
    assert (
        methods.image_free("mobileclip")
        and not methods.image_free("clip_kd")
        and not methods.image_free("relational")
    )


def test_an_interchangeable_teacher_is_not_evaluated_again(methods, monkeypatch):
    class Rebuilt:
        def fingerprint(self):
            return "t3"

    figures = metrics(0.4, 0.5, 0.5)
    monkeypatch.setattr(methods.equivalence, "load_teachers", lambda: {"t1": figures})
    monkeypatch.setattr(methods.equivalence, "load_aliases", lambda: {"t3": "t2", "t2": "t1"})
    monkeypatch.setattr(
        methods.equivalence, "evaluate", lambda *a, **k: pytest.fail("evaluated an interchangeable teacher")
    )
    assert methods.teacher_metrics({"teacher": Rebuilt()}, None) is figures
    # a cycle, no recorded figures
    monkeypatch.setattr(methods.equivalence, "load_aliases", lambda: {"t3": "t4", "t4": "t3"})
    with pytest.raises(pytest.fail.Exception):
        methods.teacher_metrics({"teacher": Rebuilt()}, None)


def test_teacher_figures_fill_gaps_from_interchangeable_teachers_only(methods):
    teachers = {"old": {"cifar10": 1}, "new": {"cifar10": 2, "cifar10-b2n": 3}, "other": {"mnist": 4}}
    figs = methods.teacher_figures("old", teachers, {"new": "old"})
    # its own figure first, the gap from "new", nothing of "other"
    assert figs == {"cifar10": 1, "cifar10-b2n": 3}


def test_render_alone_keeps_the_recorded_teachers_figures(methods, tmp_path, monkeypatch):
    path = tmp_path / "methods_teacher.json"
    teachers = {"t1": {"cifar10": 1}, "t2": {"cifar10": 2}}
    assert methods.recorded_teacher(teachers, path) is None  # nothing recorded: no teacher row
    path.write_text('{"current": "t3"}')
    # t3 measured interchangeable with t2
    monkeypatch.setattr(methods.teachers, "load_aliases", lambda: {"t3": "t2"})
    assert methods.recorded_teacher(teachers, path) == {"cifar10": 2}
    monkeypatch.setattr(methods.teachers, "load_aliases", lambda: {})
    assert methods.recorded_teacher(teachers, path) is None  # an unmeasured rebuild borrows no figures


def test_close_cells_extend_undecided_tables_only(methods):
    ours = [(0.30, 0.10), (0.31, 0.10), (0.29, 0.11)]
    recs = [record("relational", s, *v) for s, v in enumerate(ours)]
    recs += [record("clip_kd", s, 0.29, 0.10) for s in range(3)]  # best published: ours is within the spread
    recs += [record("clip_kd_crd", s, 0.28, 0.10) for s in range(3)]  # second best
    recs += [record("clip_kd_fd", s, 0.10, 0.10) for s in range(3)]
    recs += [record("no_teacher", s, 0.9, 0.9) for s in range(3)]  # not published: never a rival
    cells = methods.close_cells(recs)
    assert [c.name for c in cells] == [
        f"{m}-A-image-s{s}" for m in ("relational", "clip_kd", "clip_kd_crd") for s in (3, 4)
    ]
    # the choice reads seeds 0-2 only: a finished seed 3 of another method does not change it
    assert methods.close_cells(recs + [record("clip_kd_fd", 3, 0.9, 0.9)]) == cells
    decided = [r for r in recs if r["cell"]["method"] != "relational"]
    decided += [record("relational", s, 0.60, 0.10) for s in range(3)]  # +15 points, std 0: a clear win
    assert methods.close_cells(decided) == []
    assert methods.close_cells([r for r in recs if r["cell"]["seed"] < 2]) == []  # fewer than 3 base seeds


def test_a_seed0_screen_lead_does_not_displace_a_confirmed_variant(methods):
    """Selection reads the dev mean over seeds 0-2 once a variant has them; the seed-0 screen alone
    never replaces it, and a screened variant that is then confirmed with a better dev mean does."""
    confirmed = [record("relational_tau10", s, 0.3, 0.3, dev=d) for s, d in enumerate((0.040, 0.045, 0.050))]
    default = [record("relational", s, 0.3, 0.3, dev=d) for s, d in enumerate((0.050, 0.030, 0.030))]
    screen = [record("relational_w2", 0, 0.3, 0.3, dev=0.060)]
    assert methods.select_relational(confirmed + default + screen) == "relational_tau10"
    better = screen + [record("relational_w2", s, 0.3, 0.3, dev=0.050) for s in (1, 2)]  # mean 0.0533 > 0.045
    assert methods.select_relational(confirmed + default + better) == "relational_w2"
    worse = screen + [record("relational_w2", s, 0.3, 0.3, dev=0.030) for s in (1, 2)]  # mean 0.04 < 0.045
    assert methods.select_relational(confirmed + default + worse) == "relational_tau10"


def test_a_variant_can_change_the_task_loss_weight(methods):
    losses = methods.recipe("relational_tau10_notask", {})
    assert losses["clip"] == 0.0 and "clip" not in losses["relational"]
    assert losses["relational"]["tau_intra_t"] == 0.1
    assert methods.recipe("relational_tau10", {})["clip"] == 1.0


def test_cells_keep_their_recipes_optimiser_groups(methods):
    # the recipes' group overrides are optim.groups; a cell trains with them beside its `losses`
    assert methods.recipe_groups("clip_cid") == {"cluster_classifier": {"lr": 1e-6}}
    assert methods.recipe_groups("clip_kd") == {"distiller": {"weight_decay": 0.01}}
    assert methods.recipe_groups("relational_tau10") == {} and methods.recipe_groups("no_teacher") == {}
    assert "groups" not in methods.recipe("clip_kd", {})
