"""Text-only corpora for a student text tower that also learns from text alone (issue 6, setting `both`).

A corpus spec is `wordnet` (WordNet 3.0 glosses from Debian's `wordnet-base` package: one text per
synset, "lemma, lemma: gloss", nouns, verbs, adjectives and adverbs; a generic corpus, not built from any
evaluation class list), `wordnet:noun` (one part of speech), or a UTF-8 text file with one text per line.

Sampling is a pure function of the run seed, the step, the rank and the micro-batch (`sample_texts`), so
a resumed run draws exactly the texts the interrupted one would have: no data position to save.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from clipdistill.data.augment import stable_seed
from clipdistill.errors import UserError

log = logging.getLogger(__name__)

WORDNET_DIRS = ("/usr/share/wordnet",)
POS = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}


def _wordnet_dir() -> Path:
    for folder in ([os.environ["WNSEARCHDIR"]] if os.environ.get("WNSEARCHDIR") else []) + list(WORDNET_DIRS):
        if (Path(folder) / "data.noun").is_file():
            return Path(folder)
    raise UserError(
        "data.texts names 'wordnet' but no WordNet database was found; install Debian's package "
        "(`apt-get install wordnet-base`) or set WNSEARCHDIR to a folder holding data.noun"
    )


def parse_wordnet_line(line: str) -> str | None:
    """ "lemma, lemma: gloss" of one line of a WordNet `data.*` file (None for the licence header)."""
    if line.startswith("  ") or "|" not in line:
        return None
    head, _, gloss = line.partition("|")
    fields = head.split()
    try:
        count = int(fields[3], 16)
    except (IndexError, ValueError):
        return None
    lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(count) if 4 + 2 * i < len(fields)]
    # WordNet marks adjective syntax as lemma(a), lemma(p), lemma(ip): drop the marker
    lemmas = [lemma.split("(")[0] for lemma in lemmas]
    gloss = gloss.strip()
    return f"{', '.join(dict.fromkeys(lemmas))}: {gloss}" if gloss else None


def load_corpus(spec: str) -> list[str]:
    """The texts of one corpus spec (see module docstring), in file order."""
    name, _, part = spec.partition(":")
    if name == "wordnet":
        folder = _wordnet_dir()
        parts = [part] if part else list(POS)
        if any(p not in POS for p in parts):
            raise UserError(
                f"data.texts: unknown WordNet part '{part}'; use one of {', '.join(POS)} or plain 'wordnet'"
            )
        texts = []
        for p in parts:
            with open(folder / POS[p], encoding="utf-8", errors="replace") as f:
                texts += [t for t in (parse_wordnet_line(line) for line in f) if t]
        return texts
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(
            f"data.texts: '{spec}' is neither 'wordnet' nor a text file; give a file with one text per line"
        )
    texts = [
        line.strip()
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()
    ]
    if not texts:
        raise UserError(f"data.texts: '{spec}' holds no text; give a file with one text per line")
    return texts


def load_corpora(specs: list[str]) -> list[str]:
    texts = [t for spec in specs for t in load_corpus(spec)]
    log.info("text corpus: %d texts from %s", len(texts), ", ".join(specs))
    return texts


def sample_texts(corpus: list[str], n: int, seed: int, step: int, rank: int, micro: int) -> list[str]:
    """`n` texts of `corpus` for one micro-batch (uniform, with replacement across steps, none repeated
    within the micro-batch when the corpus is large enough)."""
    rng = np.random.default_rng(stable_seed(seed, "texts", step, rank, micro))
    idx = rng.choice(len(corpus), size=n, replace=n > len(corpus))
    return [corpus[int(i)] for i in idx]
