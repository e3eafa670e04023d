"""The methods grid of the pretrained-student regime (benchmarks/methods/pretrained.py): which recipes the
suffix trainer takes, the headline score, and track b2n's image filter."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from helpers.bench import methods_package

from clipdistill.errors import UserError
from clipdistill.losses.distiller import Distiller
from clipdistill.train.prefix import SuffixTrainConfig, check_recipe


@pytest.fixture(scope="module")
def pretrained():
    with methods_package("bench_methods_p"):
        yield importlib.import_module("bench_methods_p.pretrained")


def test_every_method_of_the_regime_passes_the_suffix_trainers_checks(pretrained, tmp_path):
    assert "no_teacher" in pretrained.methods() and "relational" in pretrained.methods()
    assert "clip_cid" in pretrained.methods()  # with its curation of the stored sets
    centres = tmp_path / "centres.npy"
    np.save(centres, np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32))
    for method in pretrained.methods():
        losses, groups = pretrained.losses_of(method, str(centres))
        cfg = SuffixTrainConfig(losses=losses, groups=groups or None)
        check_recipe(Distiller(cfg.losses, 8, 8))


def test_excluded_methods_are_the_ones_the_suffix_trainer_refuses(pretrained):
    for method in ("clip_kd_mfd", "dclip"):
        assert method not in pretrained.methods()
        with pytest.raises(UserError):
            check_recipe(Distiller(SuffixTrainConfig(losses=pretrained.recipe(method, {})).losses, 8, 8))
    with pytest.raises(SystemExit, match="not in this regime"):
        pretrained.losses_of("dclip")


def test_headline_score_is_the_mean_retention_of_the_four_figures(pretrained):
    teacher = {
        "cifar10": {"acc1": 0.4},
        "cifar100-916": {"acc1": 0.1},
        "imagenet-1k-sample": {"acc1": 0.05, "acc5": 0.2},
        "flickr8k": {"ret_mean": 0.5},
        "dtd-10": {"acc1": 0.09},
    }
    student = {
        "cifar10": {"acc1": 0.4},
        "cifar100-916": {"acc1": 0.05},
        "imagenet-1k-sample": {"acc1": 0.9, "acc5": 0.1},
        "flickr8k": {"ret_mean": 0.25},
        "dtd-10": {"acc1": 0.9},  # near chance for the teacher: never in the score
    }
    got = pretrained.headline_score(student, teacher)
    assert got["retention"] == pytest.approx(
        {"cifar10": 1.0, "cifar100-916": 0.5, "imagenet_top5": 0.5, "flickr8k_ret_mean": 0.5}
    )
    assert got["score"] == pytest.approx(0.625)


def test_b2n_keeps_only_base_class_images(pretrained):
    labels = torch.tensor([0, 5, 4, 9, 2, 7])
    assert pretrained.base_rows(labels, 10) == [0, 2, 4]


def test_cells_are_named_by_track_setting_method_and_seed(pretrained):
    assert pretrained.cell_name("fd_only", "B", 2) == "B-image-fd_only-s2"


def test_the_no_teacher_baseline_never_fits_its_head_to_the_teachers_image_tower(pretrained):
    assert pretrained.HEAD_INIT == {"no_teacher": "caption"}
    assert pretrained.losses_of("no_teacher")[0] == {"clip": 1.0}  # and no term reads the teacher either
    for init in pretrained.HEAD_INIT.values():
        SuffixTrainConfig(head_init=init)  # a valid choice


def _cell(method: str, seed: int, score: float, track: str = "B") -> dict:
    kept = {"cifar10": score, "cifar100-916": score, "imagenet_top5": score, "flickr8k_ret_mean": score}
    return {
        "cell": {"method": method, "track": track, "setting": "image", "seed": seed},
        "headline": {"retention": kept, "score": score},
        "metrics": {"cifar10-b2n": {"hm": score / 2}},
    }


@pytest.fixture(scope="module")
def report(pretrained):
    return importlib.import_module("bench_methods_p.pretrained_report")


def test_relational_margin_is_paired_by_seed_over_the_best_published_method(report):
    # clip_kd is the best published method on the mean; tinyclip wins one seed but loses on the mean
    scores = {
        "clip_kd": [0.80, 0.84, 0.82],
        "tinyclip": [0.85, 0.70, 0.71],
        "relational": [0.83, 0.86, 0.84, 0.99],  # seed 3 has no partner: not in the margin
        "no_teacher": [0.90, 0.90, 0.90],  # not a published method: never the one to beat
    }
    cells = [_cell(m, s, v) for m, vs in scores.items() for s, v in enumerate(vs)]
    table = report.tables(cells)["B/image"]
    m = table["relational_margin"]
    assert m["over"] == "clip_kd" and m["seeds"] == [0, 1, 2]
    diffs = [3.0, 2.0, 2.0]  # points
    assert m["mean"] == pytest.approx(sum(diffs) / 3, abs=1e-3)
    assert m["std"] == pytest.approx(torch.tensor(diffs).std().item(), abs=1e-3)
    assert m["wins"] is True  # 2.33 - 2 x 0.58 >= 1
    row = table["rows"]["relational"]
    assert row["seeds"] == [0, 1, 2, 3] and row["score_mean"] == pytest.approx(0.88)
    assert row["b2n_hm"] == {"cifar10": pytest.approx(0.44)}
    two = [c for c in cells if c["cell"]["seed"] < 2]
    assert report.tables(two)["B/image"]["relational_margin"]["wins"] is False  # too few seeds


def test_report_writes_its_keys_and_keeps_the_noise_regimes(report, tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    for s, v in enumerate([0.8, 0.82, 0.81]):
        for method, score in (("relational", v), ("hinton_kd", v - 0.01)):
            (cells / f"B-image-{method}-s{s}.json").write_text(json.dumps(_cell(method, s, score)))
    (tmp_path / "methods.json").write_text(json.dumps({"summary": [1], "relational_margin": {"old": 1}}))
    (tmp_path / "doc.md").write_text(
        "intro\n<!-- pretrained methods -->\nold\n<!-- /pretrained methods -->\nend\n"
    )
    regime = {"student": "lite0", "init": "pretrained", "image_size": 128, "freeze": 5, "epochs": 10.0}
    (tmp_path / "readme.md").write_text("top\n<!-- pretrained methods -->\n<!-- /pretrained methods -->\n")
    report.render(
        cells,
        {**regime, "setting": "image"},
        results=tmp_path,
        doc=tmp_path / "doc.md",
        readme=tmp_path / "readme.md",
    )
    out = json.loads((tmp_path / "methods.json").read_text())
    assert out["summary"] == [1] and out["relational_margin"]["over"] == "hinton_kd"
    assert out["headline"]["rows"]["relational"]["seeds"] == [0, 1, 2]
    assert out["headline"]["regime"]["track"] == "B/image"
    assert "| relational | 81.0 ± 1.0 |" in (tmp_path / "summary.md").read_text()
    doc = (tmp_path / "doc.md").read_text()
    assert (
        doc.startswith("intro\n") and doc.endswith("end\n") and "old" not in doc and "| relational |" in doc
    )
    readme = (tmp_path / "readme.md").read_text()
    assert readme.startswith("top\n") and "| relational | 81.0 ± 1.0 |" in readme
    assert "Relational margin over hinton_kd" in readme and "Student:" not in readme


def test_our_variant_is_chosen_on_flickr8k_dev_alone(report, pretrained):
    cells = [_cell("relational", 0, 0.9), _cell("relational_fd", 0, 0.7), _cell("clip_kd", 0, 0.8)]
    for c, dev in zip(cells, (0.30, 0.35, 0.99)):
        c["metrics"]["dev"] = {"ret_mean": dev}
    rows = report._group(cells)["B/image"]
    assert report.select_ours(rows) == "relational_fd"  # best dev, worst test: dev decides
    assert report.margin(rows)["ours"] == "relational_fd"
    for variant in pretrained.VARIANTS:
        assert variant.startswith("relational") and variant in pretrained.methods()
        check_recipe(Distiller(SuffixTrainConfig(losses=pretrained.losses_of(variant)[0]).losses, 8, 8))


@pytest.fixture(scope="module")
def curves(pretrained):
    return importlib.import_module("bench_methods_p.curves")


def test_curves_plot_one_line_per_method_and_budget(curves, tmp_path):
    folder = tmp_path / "curves"
    folder.mkdir()
    for method, epochs in (("no_teacher", 10.0), ("tinyclip", 10.0), ("no_teacher", 30.0)):
        points = [{"step": s, "epoch": s / 10, "score": 0.7 + s / 1000} for s in range(0, 101, 10)]
        doc = {"cell": {"method": method}, "regime": {"epochs": epochs}, "points": points}
        curves.curve_path(folder, f"B-image-{method}-s0", epochs).write_text(json.dumps(doc))
    assert sorted(p.name for p in folder.iterdir())[0] == "B-image-no_teacher-s0-e10.json"
    png = tmp_path / "curves.png"
    curves.plot(folder, png)
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(SystemExit, match="no curves"):
        curves.plot(tmp_path / "empty", png)


def test_curves_of_an_unknown_or_excluded_method_exit_2_before_any_work(pretrained, monkeypatch, capsys):
    for bad in ("dclip", "nope"):
        monkeypatch.setattr("sys.argv", ["pretrained", "--curves", bad])
        with pytest.raises(SystemExit) as exc:
            pretrained.main()
        assert exc.value.code == 2
        assert "choose from" in capsys.readouterr().err


def test_clip_cid_curation_drops_near_duplicates_and_clusters_kept_and_unpaired_images(
    pretrained, monkeypatch, tmp_path
):
    from clipdistill.train.prefix import Activations

    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1)
    base[280:] = base[:20] + 1e-3 * torch.randn(20, 16, generator=g)  # 20 near-copies of the first 20
    n, nu = len(base), 100
    paired = Activations(torch.zeros(1, n, 1, 1, 1), base[None], keys=[f"p{i}" for i in range(n)])
    unpaired = Activations(torch.zeros(1, nu, 1, 1, 1), torch.randn(1, nu, 16, generator=g))
    monkeypatch.setattr(pretrained, "train_sets", lambda track: (paired, unpaired))
    kept, centres = pretrained.curation("B", tmp_path)
    dropped = set(range(n)) - set(kept)
    assert len(dropped) == 20 and all(i < 20 or i >= 280 for i in dropped)
    assert all(isinstance(i, int) for i in kept) and kept == sorted(kept)
    assert np.load(centres).shape == (pretrained.CLIP_CID["k"], 16)
    monkeypatch.setattr(pretrained, "train_sets", lambda track: pytest.fail("curation recomputed"))
    assert pretrained.curation("B", tmp_path) == (kept, centres)  # stored once per track
