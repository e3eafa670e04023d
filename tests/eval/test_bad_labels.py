"""Issue 23, defect 3: a label outside classnames.txt (-1, 99, or more labels than names) is refused
with one line, never scored."""

from __future__ import annotations

import io
import tarfile

import pytest
from fake_clip import class_index, lookup_model, one_hot
from helpers.cli import run_eval

from clipdistill.errors import UserError
from clipdistill.eval.runner import evaluate
from clipdistill.models import factory

CLASSES = ("cat", "dog", "bird")


def _set_label(shard, key: str, label: bytes) -> None:
    """Rewrite `key`'s .cls member of a tar shard."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            data = label if name == f"{key}.cls" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def toy(make_dataset, monkeypatch):
    """A 6-image, 3-class `toy` dataset and a `fake:` model spec that scores every image right."""
    root = make_dataset("toy", n=6, classes=CLASSES)
    model = lookup_model(root, "toy", lambda i, s: one_hot(s.label % 3, 3), class_index(CLASSES), 3)
    monkeypatch.setitem(factory._ADAPTERS, "fake", lambda rest: model)
    return root


@pytest.mark.parametrize("label", [b"-1", b"99", b"3"])
@pytest.mark.parametrize("task", ["zeroshot_classification", "base2novel"])
def test_label_outside_classnames_is_refused(toy, label, task):
    _set_label(toy / "toy" / "test" / "0.tar", "s0000004", label)
    with pytest.raises(UserError, match=rf"label {int(label)}, but classnames.txt names 3 classes"):
        evaluate("fake:x", "toy", task=task, data_root=toy, progress=False, cache=False)


def test_more_labels_than_classnames_is_refused_by_the_cli(toy, tmp_path, capsys):
    (toy / "toy" / "classnames.txt").write_text("cat\ndog\n")  # the shards still hold label 2
    out = tmp_path / "results" / "rec.json"
    rc = run_eval(toy, "--quiet", "--output", str(out))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "label 2, but classnames.txt names 2 classes (labels 0..1)" in err
    assert not (tmp_path / "results").exists()


def test_labels_inside_classnames_still_score(toy):
    record = evaluate("fake:x", "toy", data_root=toy, progress=False, cache=False)
    assert record["metrics"]["acc1"] == 1.0 and record["clipdistill"]["samples"] == 6
