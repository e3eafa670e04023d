"""Reading embeddings for curation and writing its outputs atomically (docs/methods.md section 4.1).

Inputs, one of:
- an `.npy` array (N x D, float32 or float16), memory-mapped, with sample keys in a text file (one key
  per line, row order): `--keys FILE`, else `<stem>.keys.txt` or `keys.txt` beside the array;
- an `.npz` with arrays `embeddings` (N x D) and `keys` (N strings), loaded into memory;
- a teacher cache folder (`clipdistill.data.teacher_cache` layout: `cache.json`, per shard `keys.json`
  and `image.npy` of n x K views x d): view 0 of every sample (the un-augmented view when the cache
  was built with `center_view`), gathered into memory;
- a directory holding one of the first two (`embeddings.npy` / `image_embeddings.npy` + `keys.txt`,
  or a single `.npz`).
Rows are L2-normalised on the fly, chunk by chunk, so N may exceed memory (for `.npy` inputs).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from clipdistill.errors import UserError
from clipdistill.paths import atomic_path

log = logging.getLogger(__name__)

_DIR_ARRAYS = ("embeddings.npy", "image_embeddings.npy", "embeddings.npz", "image_embeddings.npz")


def normalise(rows: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation as float32, a new array (zero rows stay zero).

    faiss computes each row's norm with the same instruction sequence whatever the batch, so a row
    normalises to the same bits whether it is read in a chunk or alone.
    """
    x = np.array(rows, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(x).all():  # NaN rows would join no group and be silently "kept"
        raise UserError(_nonfinite_message(x))
    faiss.normalize_L2(x)
    return x


def _nonfinite_message(x: np.ndarray, offset: int = 0) -> str:
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    return (
        f"the embeddings hold NaN or inf in {len(bad)} row(s) (first: row {offset + int(bad[0])}); "
        "re-extract them, or drop those rows and their keys"
    )


@dataclass
class Embeddings:
    """N x D embeddings (possibly memory-mapped) plus their sample keys.

    keys: a list of N keys, a path to a keys text file (streamed, for very large N), or None (keys are
    then the row numbers as strings).
    """

    array: np.ndarray
    keys: list[str] | Path | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 2 or self.array.shape[0] == 0:
            raise UserError(f"embeddings must be a non-empty N x D array, got shape {self.array.shape}")
        if not np.issubdtype(self.array.dtype, np.floating):
            raise UserError(f"embeddings must be floating point (float32 or float16), got {self.array.dtype}")
        if not isinstance(self.array, np.memmap) and not np.isfinite(self.array).all():
            raise UserError(_nonfinite_message(self.array))  # memory-mapped arrays are checked chunk by chunk
        if isinstance(self.keys, list) and len(self.keys) != len(self):
            raise UserError(
                f"{len(self.keys)} keys for {len(self)} embeddings; pass the keys file of this array"
            )

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Normalised rows [start, stop) as float32."""
        return normalise(self.array[start:stop])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Normalised rows `idx` (any order) as float32; reads the memory map in sorted order."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        out[order] = normalise(self.array[idx[order]])
        return out

    def iter_chunks(
        self, size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        stop = len(self) if stop is None else stop
        for s in range(start, stop, size):
            yield s, self.chunk(s, min(s + size, stop))

    def iter_keys(self) -> Iterator[str]:
        """Keys in row order (streamed from the keys file when there is one)."""
        if self.keys is None:
            yield from (str(i) for i in range(len(self)))
        elif isinstance(self.keys, Path):
            with open(self.keys, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f)
        else:
            yield from self.keys

    def key_list(self) -> list[str]:
        return list(self.iter_keys())


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))


def _npy_keys(array_path: Path, keys: str | Path | None) -> Path | None:
    if keys is not None:
        path = Path(keys)
        if not path.is_file():
            raise UserError(f"keys file '{path}' not found; pass a text file with one sample key per line")
        return path
    for candidate in (array_path.with_suffix(".keys.txt"), array_path.parent / "keys.txt"):
        if candidate.is_file():
            return candidate
    return None


def load_embeddings(path: str | Path, keys: str | Path | None = None) -> Embeddings:
    """Open embeddings from an `.npy` (+ keys file), an `.npz` (`embeddings`, `keys`) or a directory."""
    path = Path(path)
    if path.is_dir() and (path / "cache.json").is_file():
        return load_teacher_cache(path)
    if path.is_dir():
        found = [path / name for name in _DIR_ARRAYS if (path / name).is_file()]
        found = found or sorted(path.glob("*.npz"))
        if len(found) != 1:
            raise UserError(
                f"directory '{path}' holds {len(found)} candidate embedding files; pass the .npy or .npz file itself"
            )
        path = found[0]
    if not path.is_file():
        raise UserError(
            f"embeddings '{path}' not found; pass an .npy (with --keys) or an .npz with embeddings and keys"
        )
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "embeddings" not in z.files:
                    raise UserError(
                        f"'{path}' has arrays {z.files} but no 'embeddings'; save it with embeddings= and keys="
                    )
                array = np.asarray(z["embeddings"])
                key_list = [str(k) for k in z["keys"]] if "keys" in z.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(
                f"cannot read embeddings '{path}' ({type(err).__name__}); pass an .npz written with "
                "np.savez(embeddings=..., keys=...)"
            ) from None
        if key_list is None and keys is not None:
            key_list = Path(keys).read_text(encoding="utf-8").splitlines()
        if key_list is None:
            log.warning("'%s' has no 'keys' array; the keep-list will hold row numbers", path)
        return Embeddings(array, key_list)
    if path.suffix != ".npy":
        raise UserError(f"unsupported embeddings file '{path}'; use .npy (+ keys file) or .npz")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise UserError(
            f"cannot read embeddings '{path}' ({type(err).__name__}: {str(err)[:120]}); pass an N x D .npy array"
        ) from None
    key_path = _npy_keys(path, keys)
    if key_path is None:
        log.warning(
            "no keys file for '%s' (looked for --keys, %s.keys.txt, keys.txt); keys are row numbers",
            path,
            path.stem,
        )
    elif (n_keys := _count_lines(key_path)) != array.shape[0]:
        raise UserError(
            f"keys file '{key_path}' has {n_keys} lines for {array.shape[0]} embeddings; regenerate it"
        )
    return Embeddings(array, key_path)


def load_teacher_cache(root: str | Path, view: int = 0) -> Embeddings:
    """Image embeddings (view `view` of each sample) and keys of a teacher cache folder, in shard order."""
    root = Path(root)
    try:
        info = json.loads((root / "cache.json").read_text())
        arrays, keys = [], []
        for shard in info["shards"]:
            folder = root / "shards" / shard["dir"]
            image = np.load(folder / "image.npy", mmap_mode="r")
            arrays.append(np.asarray(image[:, view] if image.ndim == 3 else image, dtype=np.float32))
            keys += [str(k) for k in json.loads((folder / "keys.json").read_text())]
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise UserError(
            f"cannot read image embeddings from teacher cache '{root}' ({err}); rebuild the cache"
        ) from err
    if view == 0 and not info.get("parts", {}).get("augment", {}).get("center_view"):
        log.warning(
            "teacher cache '%s' was built without center_view: view 0 is a random augmented view", root
        )
    if len(set(keys)) != len(keys):
        log.warning("teacher cache '%s' repeats sample keys across shards; a keep-list filters by key", root)
    return Embeddings(np.concatenate(arrays), keys)


def write_lines_atomic(path: str | Path, lines: Iterable[str]) -> Path:
    """Write one item per line to a temporary sibling, then `os.replace` it into place.

    An interruption (exception, Ctrl-C) leaves no file at `path` (or the previous one, untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(f"{line}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, obj: object) -> Path:
    return write_lines_atomic(path, [json.dumps(obj, indent=2, sort_keys=False)])


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
