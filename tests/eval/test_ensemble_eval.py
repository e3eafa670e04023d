"""`clipdistill eval --model ensemble:A+B`: an ensemble teacher evaluates through the CLI (its embedding
is the members' normalised ones, concatenated: tests/models/test_ensemble_model.py)."""

from __future__ import annotations

import json

from fake_clip import perfect_classifier
from helpers.cli import run_eval

from clipdistill.models import factory

CLASSES = ("cat", "dog", "bird", "frog", "ship")


def test_ensemble_of_two_models_evaluates(make_dataset, monkeypatch, tmp_path):
    root = make_dataset("toy", n=10, classes=CLASSES)
    built = []

    def fake(rest: str):
        # "good": a perfect classifier; "blind": every image embeds to zero, so it adds nothing
        model = perfect_classifier(root, "toy", CLASSES)
        if rest == "blind":
            model.vectors = {}
        built.append(model)
        return model

    monkeypatch.setitem(factory._ADAPTERS, "fake", fake)
    out = tmp_path / "ens.json"
    rc = run_eval(
        root, "--quiet", "--output", str(out), "--threads", "1", model="ensemble:fake:good+fake:blind"
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["model"] == "ensemble" and record["pretrained"] == "fake:good+fake:blind"
    assert record["metrics"]["acc1"] == 1.0
    assert [m.images_seen for m in built] == [10, 10]  # both members embedded every image
    assert all(m.texts_seen > 0 for m in built)
