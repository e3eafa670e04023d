"""`clipdistill demo` wiring on tiny stand-ins: the fake teacher replaces the composed one, evaluation is
stubbed (the real run needs the shared data and minutes of CPU); the second run reuses every stage."""

from __future__ import annotations

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
    cfg = demo.DemoConfig(out=str(tmp_path / "demo"), data_root=str(root), teacher_dir=str(tmp_path / "teacher"),
                          student="student:vit-t-32", batch_size=8, workers=0, quick=True)
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


def test_demo_command_help(capsys):
    from clipdistill.cli.main import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--teacher-dir" in capsys.readouterr().out
