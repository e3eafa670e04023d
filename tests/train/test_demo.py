"""`clipdistill demo` wiring on tiny stand-ins: the fake teacher replaces the composed one, evaluation is
stubbed (the real run needs the shared data and minutes of CPU); the second run reuses every stage."""

from __future__ import annotations

import json

import pytest
from tiny_models import FakeTeacher

from clipdistill.models import factory
from clipdistill.train import demo


class _Teacher(FakeTeacher):
    def fingerprint(self) -> str:
        return "fake"


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    import clipdistill.models.composed as composed
    import clipdistill.train.evaluate as evaluate

    monkeypatch.setenv("CLIPDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(composed, "load_teacher", lambda path, **kw: _Teacher())
    monkeypatch.setitem(factory._ADAPTERS, "teacher", lambda rest: _Teacher())
    calls = []

    def fake_eval(model, dataset, split, **kw):
        calls.append((type(model).__name__, dataset, kw.get("every")))
        good = 0.5 if isinstance(model, FakeTeacher) else 0.25
        if dataset == "flickr8k":
            return {"text_retrieval_recall@1": good, "image_retrieval_recall@1": good}
        return {"acc1": good, "acc5": 2 * good}

    monkeypatch.setattr(evaluate, "run_eval", fake_eval)
    return calls


def test_demo_end_to_end_and_reuse(stand_ins, make_dataset, tmp_path):
    root = make_dataset("flickr8k", kind="retrieval", n=16, split="train")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "teacher.json").write_text("{}")
    cfg = demo.DemoConfig(
        out=str(tmp_path / "demo"),
        data_root=str(root),
        teacher_dir=str(tmp_path / "teacher"),
        student="student:vit-t-32",
        student_init="random",
        image_size=None,
        freeze=0,
        batch_size=8,
        workers=0,
        quick=True,
    )
    first = demo.run_demo(cfg)
    table = first["table"]
    assert "| flickr8k (every 50th sample) text_retrieval_recall@1 | 50.0 | 25.0 | 50 |" in table
    assert "cifar10 (every 50th sample) acc1" in table and "image encoder latency" in table
    assert first["training"]["steps"] == 3
    assert {c[0] for c in stand_ins} == {"_Teacher", "ImageOnlyStudent"}
    mtime = (tmp_path / "demo" / "student" / "student.pt").stat().st_mtime
    second = demo.run_demo(cfg)
    assert (tmp_path / "demo" / "student" / "student.pt").stat().st_mtime == mtime  # the student is reused

    def figures(t: str) -> list[str]:
        return [line for line in t.splitlines() if "latency" not in line]  # timings vary

    assert figures(second["table"]) == figures(table)


def test_demo_trains_a_pretrained_student_from_stored_prefixes(stand_ins, make_dataset, tmp_path):
    root = make_dataset("flickr8k", kind="retrieval", n=16, split="train")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "teacher.json").write_text("{}")
    cfg = demo.DemoConfig(
        out=str(tmp_path / "demo"),
        data_root=str(root),
        teacher_dir=str(tmp_path / "teacher"),
        image_size=32,
        batch_size=8,
        quick=True,
    )
    assert (
        cfg.student == "student:efficientnet-lite0" and cfg.student_init == "pretrained" and cfg.freeze == 5
    )
    first = demo.run_demo(cfg)
    summary = json.loads((tmp_path / "demo" / "student" / "summary.json").read_text())
    assert summary["images"] == 16 and summary["steps"] == 20 and summary["training"]["ridge_head_cosine"] > 0
    assert "x faster" in first["table"]
    mtime = (tmp_path / "demo" / "student" / "student.pt").stat().st_mtime
    demo.run_demo(cfg)
    assert (tmp_path / "demo" / "student" / "student.pt").stat().st_mtime == mtime  # reused


def test_demo_command_help(capsys):
    from clipdistill.cli.main import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--teacher-dir" in out and "efficientnet-lite0" in out and "ImageNet weights" in out


def test_retention_only_where_the_teacher_beats_chance(make_dataset):
    root = make_dataset("ten", classes=[str(i) for i in range(10)])
    rows = [
        {"image_params_m": 5.0, "image_latency_ms": 40.0, "metrics": {"ten": {"acc1": 0.12, "acc5": 0.6}}},
        {"image_params_m": 1.0, "image_latency_ms": 10.0, "metrics": {"ten": {"acc1": 0.15, "acc5": 0.3}}},
    ]
    table = demo.format_table(rows, str(root))
    assert "| ten acc1 | 12.0 | 15.0 | teacher at chance (10.0): no ratio |" in table
    assert "| ten acc5 | 60.0 | 30.0 | teacher at chance (50.0): no ratio |" in table
    assert "4.0x faster" in table
    rows[0]["metrics"]["ten"]["acc1"] = 0.4
    assert "| ten acc1 | 40.0 | 15.0 | 38 |" in demo.format_table(rows, str(root))


def test_bad_demo_options_are_refused_before_any_work(tmp_path):
    from clipdistill.errors import UserError

    with pytest.raises(UserError, match="unknown student preset 'nosuch'"):
        demo.DemoConfig(out=str(tmp_path / "d"), student="student:nosuch").check()
    with pytest.raises(UserError, match="must be > 0"):
        demo.DemoConfig(out=str(tmp_path / "d"), epochs=-1).check()
    with pytest.raises(UserError, match="valid for it: random, inherit"):
        demo.DemoConfig(out=str(tmp_path / "d"), student="student:vit-t-32").check()
    assert not (tmp_path / "d").exists()
