"""Issue 23: the data package does not depend on eval (`data.filter` owns the class filter)."""

from __future__ import annotations

import subprocess
import sys


def test_data_filter_imports_no_eval_module():
    code = (
        "import sys\n"
        "from clipdistill.data.filter import filter_labels, parse_data_filter, split_classes\n"
        "import clipdistill.data.loader, clipdistill.data.teacher_cache\n"
        "bad = sorted(m for m in sys.modules if m.startswith('clipdistill.eval'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_eval_base2novel_reexports_the_filter():
    from clipdistill.data import filter as data_filter
    from clipdistill.eval import base2novel

    assert base2novel.parse_data_filter is data_filter.parse_data_filter
    assert base2novel.split_classes is data_filter.split_classes
