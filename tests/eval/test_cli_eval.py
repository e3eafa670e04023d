"""`clipdistill eval` and `clipdistill compare`: a fake model end to end, the tables, and bad input
(exit status 2 with one line on stderr, no traceback)."""

from __future__ import annotations

import json

import pytest
from fake_clip import perfect_classifier
from helpers.cli import one_line_error, run_eval

from clipdistill.cli.main import main
from clipdistill.eval.report import compare, format_record
from clipdistill.models import factory

CLASSES = ("cat", "dog", "bird", "frog", "ship")


@pytest.fixture
def toy(make_dataset, monkeypatch):
    """Data root with a 10-image `toy` dataset, and a `fake:` model spec prefix that builds a perfect model."""
    root = make_dataset("toy", n=10, classes=CLASSES)
    monkeypatch.setitem(factory._ADAPTERS, "fake", lambda rest: perfect_classifier(root, "toy", CLASSES))
    return root


def test_unknown_model_prefix(toy, capsys):
    rc = run_eval(toy, model="nope:x")
    one_line_error(capsys, rc, "unknown model spec prefix 'nope'", "known:")


def test_missing_data_root(tmp_path, capsys):
    rc = run_eval(tmp_path / "nowhere")
    one_line_error(capsys, rc, "nowhere", "--data-root")


def test_missing_dataset_directory(toy, capsys):
    rc = run_eval(toy, dataset="tyo")
    one_line_error(capsys, rc, "unknown dataset 'tyo'", "did you mean 'toy'")


def test_wrong_split(toy, capsys):
    rc = run_eval(toy, "--split", "val")
    one_line_error(capsys, rc, "no split 'val'", "available splits: test")


def test_wrong_task(toy, capsys):
    rc = run_eval(toy, "--task", "base2nvel")
    one_line_error(capsys, rc, "unknown task", "did you mean 'base2novel'")
    rc = run_eval(toy, "--task", "zeroshot_retrieval")
    one_line_error(capsys, rc, "needs a retrieval dataset")


def test_bad_every(toy, capsys):
    rc = run_eval(toy, "--every", "0")
    one_line_error(capsys, rc, "--every")


def test_compare_missing_file(tmp_path, capsys):
    rc = main(["compare", str(tmp_path / "none.json")])
    one_line_error(capsys, rc, "not found")
    (tmp_path / "bad.json").write_text("{not json")
    rc = main(["compare", str(tmp_path / "bad.json")])
    one_line_error(capsys, rc, "cannot read")


@pytest.mark.parametrize("cmd", [["eval", "--help"], ["compare", "--help"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main(cmd)
    assert exc.value.code == 0 and "usage: clipdistill" in capsys.readouterr().out


def test_eval_prints_table_writes_json_and_compare_reads_it(toy, tmp_path, capsys):
    out = tmp_path / "results" / "fake-toy.json"
    rc = run_eval(toy, "--quiet", "--output", str(out), "--threads", "1", model="fake:perfect")
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| top-1 | 100.0 |" in printed and "10 samples" in printed
    rec = json.loads(out.read_text())
    assert (
        rec["model"] == "fake:perfect"
        and rec["pretrained"] == "random"
        and rec["task"] == "zeroshot_classification"
    )
    assert rec["metrics"]["acc1"] == 1.0 and rec["clipdistill"]["spec"] == "fake:perfect"
    rc = main(["compare", str(tmp_path / "results" / "*.json")])
    table = capsys.readouterr().out
    assert rc == 0
    assert table.splitlines()[0] == "| model | toy top-1 | toy top-5 |"
    assert table.splitlines()[2] == "| fake:perfect | 100.0 | 100.0 |"


def _rec(spec, dataset, task, metrics, every=1):
    return {
        "dataset": dataset,
        "model": spec,
        "pretrained": "random",
        "task": task,
        "metrics": metrics,
        "clipdistill": {
            "spec": spec,
            "split": "test",
            "every": every,
            "samples": 10,
            "skipped": 0,
            "seconds": 1.0,
        },
    }


def test_compare_table_across_models_and_datasets():
    records = [
        _rec(
            "a",
            "cifar10",
            "zeroshot_classification",
            {"acc1": 0.4, "acc5": 0.9, "mean_per_class_recall": 0.41},
        ),
        _rec(
            "b",
            "cifar10",
            "zeroshot_classification",
            {"acc1": 0.25, "acc5": 0.7, "mean_per_class_recall": 0.2},
            every=5,
        ),
        _rec(
            "a",
            "flickr8k",
            "zeroshot_retrieval",
            {"text_retrieval_recall@1": 0.267, "image_retrieval_recall@1": 0.2034},
        ),
        _rec("b", "cifar10", "base2novel", {"base_acc1": 0.5, "novel_acc1": 0.25, "hm": 1 / 3}),
    ]
    assert compare(records) == (
        "| model | cifar10 top-1 | cifar10 top-5 | cifar10 b2n base | cifar10 b2n novel | cifar10 b2n HM "
        "| cifar10* top-1 | cifar10* top-5 | flickr8k I->T R@1 | flickr8k T->I R@1 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| a | 40.0 | 90.0 | - | - | - | - | - | 26.7 | 20.3 |\n"
        "| b | - | - | 50.0 | 25.0 | 33.3 | 25.0 | 70.0 | - | - |\n"
        "\n\\* 1 in N test samples only (see the record's `clipdistill.every`)\n"
    )
    assert "mean recall" in compare(records, all_metrics=True)


def test_format_record_shows_percent():
    text = format_record(_rec("a", "cifar10", "linear_probe", {"acc1": 0.5, "mean_per_class_recall": 0.125}))
    assert "| LP top-1 | 50.0 |" in text and "| LP mean recall | 12.5 |" in text
