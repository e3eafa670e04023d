"""Issue 23: the data package does not depend on eval (`data.filter` owns the class filter)."""

from __future__ import annotations

from helpers.imports import fresh_import


def test_data_filter_imports_no_eval_module():
    modules = ("clipdistill.data.filter", "clipdistill.data.loader", "clipdistill.data.teacher_cache")
    with fresh_import(*modules) as loaded:
        import clipdistill.data.filter as fresh

        assert set(modules) <= loaded and all(
            hasattr(fresh, name) for name in ("filter_labels", "parse_data_filter", "split_classes")
        )
        assert not sorted(m for m in loaded if m.startswith("clipdistill.eval"))


def test_eval_base2novel_reexports_the_filter():
    from clipdistill.data import filter as data_filter
    from clipdistill.eval import base2novel

    assert base2novel.parse_data_filter is data_filter.parse_data_filter
    assert base2novel.split_classes is data_filter.split_classes
