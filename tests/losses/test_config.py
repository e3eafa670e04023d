"""The `losses:` config: parsing, every refusal at load time, the shipped recipes, `clipdistill losses`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from clipdistill.cli.main import main
from clipdistill.errors import UserError
from clipdistill.losses import TERMS, Distiller, LossConfig, Term, load_loss_config, parse_loss_config
from clipdistill.losses.base import NEEDS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_numbers_and_mappings_parse_with_default_weights():
    cfg = parse_loss_config(
        {"clip": 1, "fd": {"form": "cosine"}, "icl": {"weight": 0.5, "faithful": True}, "crd": "1e-3"}
    )
    assert cfg.weights == {"clip": 1.0, "fd": 2000.0, "icl": 0.5, "crd": 0.001}
    assert list(cfg.weights) == ["clip", "fd", "icl", "crd"]  # config order is kept
    assert cfg.options == {"clip": {}, "fd": {"form": "cosine"}, "icl": {"faithful": True}, "crd": {}}
    assert parse_loss_config(cfg.to_spec()) == cfg


def test_unknown_term_lists_valid_names_and_suggests():
    with pytest.raises(UserError) as err:
        parse_loss_config({"clip": 1.0, "crdd": 1.0})
    msg = str(err.value)
    assert "unknown loss term 'crdd'" in msg and "did you mean 'crd'" in msg
    for name in TERMS:
        assert name in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "bad", [-1, -0.5, "abc", None, True, [1.0], float("nan"), float("inf"), {"weight": -2}, {"weight": "x"}]
)
def test_negative_or_non_numeric_weights_are_refused(bad):
    with pytest.raises(UserError, match="losses.crd weight"):
        parse_loss_config({"crd": bad})


def test_zero_weight_is_allowed():
    assert parse_loss_config({"clip": 1.0, "crd": 0}).weights["crd"] == 0.0


def test_unknown_option_lists_the_terms_options():
    with pytest.raises(UserError, match="term 'fd' has no option 'fom'; its options: form, reference_dim"):
        parse_loss_config({"fd": {"fom": "mse"}})
    with pytest.raises(UserError, match="term 'crd' has no option 'faithful'"):
        parse_loss_config({"crd": {"faithful": True}})  # crd has no published quirk


def test_option_types_follow_defaults():
    with pytest.raises(UserError, match="losses.icl.faithful"):
        parse_loss_config({"icl": {"faithful": "yes"}})
    with pytest.raises(UserError, match="losses.kd.temperature"):
        parse_loss_config({"kd": {"temperature": "hot"}})


def test_missing_required_option_fails_at_load(monkeypatch):
    class Needy(Term):
        name = "needy"
        options = {"path": None}
        required_options = ("path",)

    monkeypatch.setitem(TERMS, "needy", Needy)
    with pytest.raises(UserError, match="term 'needy' needs option 'path'; set losses.needy.path"):
        parse_loss_config({"needy": 1.0})
    assert parse_loss_config({"needy": {"path": "x"}}).options["needy"] == {"path": "x"}


def test_groups_moved_to_the_optimiser_section():
    # optimiser-group overrides are optim.groups (tests/train/test_run_config.py); a bare `losses:` mapping
    # with the old spelling names the new key in one line
    with pytest.raises(UserError, match="moved from losses.groups to optim.groups") as err:
        parse_loss_config({"clip": 1.0, "groups": {"distiller": {"lr": 0.1}}})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", [{}, {"groups": {}}, [], "clip"])
def test_empty_or_malformed_section_is_refused(spec):
    with pytest.raises(UserError, match="known terms"):
        parse_loss_config(spec)


def test_load_loss_config_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_loss_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("student: x\n")
    with pytest.raises(UserError, match="no `losses:` section"):
        load_loss_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("losses: {clip: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_loss_config(tmp_path / "b.yaml")


def test_the_recipes_exist():
    names = {p.stem for p in RECIPES}
    expected = {"clip_kd", "tinyclip", "clip_cid", "comkd", "dclip", "mobileclip", "relational", "baseline"}
    expected |= {f"clip_kd_{t}" for t in ("crd", "fd", "mfd", "gd", "icl", "afd")}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses_builds_and_passes_its_checks(path):
    text = path.read_text()
    assert text.startswith("#") and "spec section" in text  # the header names paper and section
    cfg = load_loss_config(path)
    if "cluster" in cfg.options:  # the recipe points at a centres file produced by `clipdistill cluster`
        cfg.options["cluster"] = {**cfg.options["cluster"], "centres": None, "centres_array": np.eye(4, 8)}
    dist = Distiller(cfg, 6, 8)
    dist.check("online", set(NEEDS))
    assert {g["name"] for g in dist.param_groups(1e-3, 0.1)} <= set(dist.group_names())


def test_published_recipe_values():
    best = load_loss_config(CONFIGS / "clip_kd.yaml")
    assert best.weights == {"clip": 1.0, "crd": 1.0, "icl": 1.0, "fd": 2000.0}
    tiny = load_loss_config(CONFIGS / "tinyclip.yaml")
    assert tiny.weights == {"affinity": 1.0} and tiny.options["affinity"]["faithful"] is True
    cid = load_loss_config(CONFIGS / "clip_cid.yaml")
    assert cid.weights == {"clip": 1.0, "cluster": 1.0, "instance": 0.5}
    assert yaml.safe_load((CONFIGS / "clip_cid.yaml").read_text())["optim"] == {
        "groups": {"cluster_classifier": {"lr": 1e-6}}
    }
    mobile = load_loss_config(CONFIGS / "mobileclip.yaml")
    assert mobile.weights == {"kd": 1.0} and mobile.options["kd"]["teacher_scale"] == 100.0
    for term in ("crd", "fd", "mfd", "gd", "icl", "afd"):
        assert set(load_loss_config(CONFIGS / f"clip_kd_{term}.yaml").weights) == {"clip", term}
    assert load_loss_config(CONFIGS / "baseline.yaml") == LossConfig({"clip": 1.0}, {"clip": {}})
    recipe = yaml.safe_load((CONFIGS / "relational.yaml").read_text())
    assert set(recipe) == {"losses"}  # other sections are added by the engine's recipes


def test_cli_lists_every_term(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["term", "default", "weight"]
    listed = {line.split()[0] for line in out[1:]}
    assert listed == set(TERMS)
    fd = next(line for line in out if line.startswith("fd "))
    assert "2000" in fd and "teacher_text" in fd and "CLIP-KD" in fd


def test_cli_markdown_and_check(capsys, tmp_path):
    assert main(["losses", "--markdown", "--options"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| term | default weight | needs | faithful | options | source |"
    assert len(lines) == len(TERMS) + 2
    assert any(line.startswith("| mfd | 2000 | masked_view, teacher, teacher_text |") for line in lines)
    assert main(["losses", "--check", str(CONFIGS / "clip_kd.yaml")]) == 0
    assert "fd x 2000" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("losses: {clip: 1.0, crdd: 1.0}\n")
    assert main(["losses", "--check", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'crd'" in capsys.readouterr().err
