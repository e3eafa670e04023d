"""Text corpora for the `both` setting: WordNet gloss parsing, files, deterministic sampling, errors."""

from __future__ import annotations

import pytest

from clipdistill.data.texts import load_corpus, parse_wordnet_line, sample_texts
from clipdistill.errors import UserError

NOUN = (
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | a member of the genus "
    'Canis (probably descended from the common wolf); "the dog barked all night"  '
)
ADJ = "00001740 00 a 01 able(p) 0 005 = 05207437 n 0000 | (usually followed by `to') having the necessary means  "


def test_parse_wordnet_lines():
    assert parse_wordnet_line(NOUN) == (
        "dog, domestic dog, Canis familiaris: a member of the genus Canis (probably "
        'descended from the common wolf); "the dog barked all night"'
    )
    assert parse_wordnet_line(ADJ).startswith("able: (usually followed by")
    assert parse_wordnet_line("  1 This software and database is being provided") is None


def test_wordnet_folder_and_file_corpus(tmp_path, monkeypatch):
    (tmp_path / "wn").mkdir()
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (tmp_path / "wn" / name).write_text(
            "  1 licence header\n" + (NOUN if name == "data.noun" else ADJ) + "\n"
        )
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "wn"))
    assert len(load_corpus("wordnet")) == 4 and len(load_corpus("wordnet:noun")) == 1
    with pytest.raises(UserError, match="unknown WordNet part"):
        load_corpus("wordnet:nouns")
    f = tmp_path / "c.txt"
    f.write_text("one\n\n two \nthree")
    assert load_corpus(str(f)) == ["one", "two", "three"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="holds no text"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_missing_wordnet_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path))
    monkeypatch.setattr("clipdistill.data.texts.WORDNET_DIRS", ())
    with pytest.raises(UserError, match="wordnet-base"):
        load_corpus("wordnet")


def test_sampling_is_a_pure_function_of_seed_step_rank_micro():
    corpus = [f"t{i}" for i in range(100)]
    a = sample_texts(corpus, 8, 0, 5, 0, 1)
    assert a == sample_texts(corpus, 8, 0, 5, 0, 1) and len(set(a)) == 8
    assert a != sample_texts(corpus, 8, 0, 6, 0, 1) and a != sample_texts(corpus, 8, 0, 5, 1, 1)
    assert len(sample_texts(corpus[:3], 8, 0, 0, 0, 0)) == 8  # small corpus: with replacement
