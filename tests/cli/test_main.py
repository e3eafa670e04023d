"""The top-level parser: KEY=VALUE overrides on both sides of an option reach the config."""

from __future__ import annotations

import pytest

from clipdistill.cli.main import main


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("losses: {clip: 1.0}\n")
    return str(path)


def test_overrides_on_both_sides_of_an_option(config, capsys):
    assert main(["distill", "steps=2", "--config", config, "nosuch_key=1"]) == 2
    err = capsys.readouterr().err
    assert "nosuch_key" in err and "unrecognized arguments" not in err


def test_stray_flags_are_still_refused(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "steps=2", "--config", config, "--no-such-flag"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
