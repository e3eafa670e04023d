"""Shared test fixtures: tiny synthetic shards written in a tmp dir, seeded RNG."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _png_bytes(rng: np.random.Generator, size: int = 16) -> bytes:
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> Path:
    """Write a tar (or tar.gz) shard holding `members` (name, bytes) in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def make_dataset(tmp_path):
    """Factory for a CLIP_benchmark-style dataset folder with synthetic images.

    make_dataset("toy", kind="classification", n=8, classes=["a", "b"]) -> root folder (data root).
    """

    def make(
        name: str,
        kind: str = "classification",
        n: int = 8,
        classes=("cat", "dog"),
        split="test",
        shards: int = 1,
        gz: bool = False,
        corrupt: tuple[int, ...] = (),
        no_caption: tuple[int, ...] = (),
    ):
        rng = np.random.default_rng(0)
        root = tmp_path / "data"
        folder = root / name
        (folder / split).mkdir(parents=True, exist_ok=True)
        (folder / "dataset_type.txt").write_text(kind)
        if kind == "classification":
            (folder / "classnames.txt").write_text("\n".join(classes))
            (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.")
        per = (n + shards - 1) // shards
        for s in range(shards):
            members = []
            for i in range(s * per, min(n, (s + 1) * per)):
                key = f"s{i:07d}"
                img = b"\xff\xd8\xff\xe0garbage" if i in corrupt else _png_bytes(rng)
                members.append((f"{key}.{'jpg' if i in corrupt else 'png'}", img))
                if kind == "classification":
                    members.append((f"{key}.cls", str(i % len(classes)).encode()))
                elif i not in no_caption:
                    members.append((f"{key}.txt", f"caption {i} one\ncaption {i} two".encode()))
            write_shard(folder / split / (f"{s}.tar.gz" if gz else f"{s}.tar"), members, gz=gz)
        (folder / split / "nshards.txt").write_text(str(shards))
        return root

    return make


@pytest.fixture(scope="session", autouse=True)
def _tokenizers_built_once():
    """open_clip's SimpleTokenizer reads and parses its 49k-merge BPE file on every construction (70 ms of
    CPU; the suite builds over a hundred models): each distinct one is built once, the later ones share its
    read-only tables (and its memo of encoded words). Tokenisation is unchanged."""
    from open_clip.tokenizer import SimpleTokenizer

    build = SimpleTokenizer.__init__
    built: dict[str, dict] = {}

    def init(self, *args, **kwargs) -> None:
        key = repr((args, sorted(kwargs.items())))
        if key in built:
            vars(self).update(built[key])
            return
        build(self, *args, **kwargs)
        built[key] = dict(vars(self))

    SimpleTokenizer.__init__ = init
    yield
    SimpleTokenizer.__init__ = build
