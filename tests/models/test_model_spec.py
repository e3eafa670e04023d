"""`parse_spec`: the one parser of model spec strings (kind:name[/tag][@checkpoint])."""

from __future__ import annotations

import pytest

from clipdistill.errors import UserError
from clipdistill.eval.runner import split_spec
from clipdistill.models.factory import ModelSpec, check_spec, create_model, parse_spec

GOOD = [
    ("student:vit-t-32", ModelSpec("student", "vit-t-32")),
    (
        "student:vit-t-32@/runs/a/student.pt",
        ModelSpec("student", "vit-t-32", checkpoint="/runs/a/student.pt"),
    ),
    ("openclip:ViT-B-32", ModelSpec("openclip", "ViT-B-32")),
    ("openclip:ViT-B-32/laion2b_s34b_b79k", ModelSpec("openclip", "ViT-B-32", tag="laion2b_s34b_b79k")),
    ("openclip:ViT-B-32@/ck/last.pt", ModelSpec("openclip", "ViT-B-32", checkpoint="/ck/last.pt")),
    ("openclip:ViT-B-32@ck@2.pt", ModelSpec("openclip", "ViT-B-32", checkpoint="ck@2.pt")),
    ("openclip:hf-hub:org/name", ModelSpec("openclip", "hf-hub:org/name")),
    ("openclip:local-dir:/exports/oc", ModelSpec("openclip", "local-dir:/exports/oc")),
    ("openclip:/exports/oc", ModelSpec("openclip", "/exports/oc")),
    ("openclip:./exports/oc", ModelSpec("openclip", "./exports/oc")),
    ("openclip:~/exports/oc", ModelSpec("openclip", "~/exports/oc")),
    ("hf:openai/clip-vit-base-patch32", ModelSpec("hf", "openai/clip-vit-base-patch32")),
    ("hf:/models/clip@v2", ModelSpec("hf", "/models/clip@v2")),
    ("teacher:/t/dir", ModelSpec("teacher", "/t/dir")),
    ("fake:24", ModelSpec("fake", "24")),
    ("hf:", ModelSpec("hf", "")),  # the builder names what is missing ("empty hf spec")
]


@pytest.mark.parametrize(("text", "spec"), GOOD, ids=[t for t, _ in GOOD])
def test_good_specs_parse_and_round_trip(text, spec):
    parsed = parse_spec(text)
    assert parsed == spec
    assert str(parsed) == text
    assert parse_spec(str(parsed)) == parsed
    assert f"{parsed.kind}:{parsed.rest}" == text


def test_spec_is_frozen_and_hashable():
    spec = parse_spec("student:vit-t-32")
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert {spec, parse_spec("student:vit-t-32")} == {spec}


def test_with_checkpoint_replaces_weights():
    assert (
        str(parse_spec("student:vit-t-32").with_checkpoint("/r/student.pt"))
        == "student:vit-t-32@/r/student.pt"
    )
    assert (
        str(parse_spec("student:vit-t-32@/old.pt").with_checkpoint("/new.pt")) == "student:vit-t-32@/new.pt"
    )
    assert str(parse_spec("openclip:ViT-B-32/laion").with_checkpoint("/w.pt")) == "openclip:ViT-B-32@/w.pt"


def test_folder_kinds():
    assert [
        parse_spec(s).is_folder for s in ("teacher:/d", "hf:org/x", "openclip:/d", "openclip:hf-hub:o/x")
    ] == [True] * 4
    assert [parse_spec(s).is_folder for s in ("openclip:ViT-B-32", "student:x@/w.pt", "fake:1")] == [
        False
    ] * 3


def test_split_spec_follows_parse_spec():
    assert split_spec("openclip:/exports/oc") == ("openclip", "/exports/oc")
    assert split_spec("openclip:hf-hub:org/x") == ("openclip", "hf-hub:org/x")
    assert split_spec("not a spec") == ("not a spec", "random")


BAD = [
    ("vit-t-32", "has no prefix"),
    ("", "has no prefix"),
    (":vit-t-32", "has no prefix"),
    ("student:vit-t-32@", "a weights file after it"),
    ("student:@/w.pt", "a name before '@'"),
    ("openclip:ViT-B-32@", "a weights file after it"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[t or "empty" for t, _ in BAD])
def test_bad_specs_raise_one_line(text, message):
    with pytest.raises(UserError, match=message) as err:
        parse_spec(text)
    assert len(str(err.value).splitlines()) == 1
    assert repr(text)[1:-1] in str(err.value)
    with pytest.raises(UserError, match=message):
        create_model(text)


def test_unknown_prefix_is_refused_by_check_spec_not_by_parse():
    assert parse_spec("nope:x") == ModelSpec("nope", "x")
    with pytest.raises(UserError, match="unknown model spec prefix 'nope'") as err:
        check_spec("nope:x")
    assert len(str(err.value).splitlines()) == 1
