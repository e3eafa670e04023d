"""A content-addressed store of frozen-tower features, so no image is pushed through a slow frozen
tower twice (the offline teacher's image tower runs at 6-24 img/s on a 2-core CPU; docs/methods.md section 9).

Keys are a hash of the exact preprocessed input tensor plus the tower's identity, so a hit is only
possible for the same pixels through the same preprocessing and weights. Stored in SQLite (atomic
commits, safe against interruption and concurrent readers).
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def tensor_digest(x: Tensor) -> str:
    """A stable digest of one input tensor's values, shape and dtype."""
    arr = x.detach().cpu().contiguous().numpy()
    h = hashlib.blake2b(digest_size=16)
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


class FeatureCache:
    """Feature vectors of one frozen tower keyed by input digest: `get_many`, `put_many`."""

    def __init__(self, path: Path, tower_id: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tower_id = tower_id
        self._db = sqlite3.connect(str(self.path), timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS feats (key TEXT PRIMARY KEY, shape TEXT, vec BLOB)")
        self._db.commit()
        self.hits = 0
        self.misses = 0

    def _key(self, digest: str) -> str:
        return f"{self.tower_id}:{digest}"

    def get_many(self, digests: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        keys = [self._key(d) for d in digests]
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = self._db.execute(
                f"SELECT key, shape, vec FROM feats WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            for key, shape, vec in rows:
                dims = tuple(int(s) for s in shape.split(",") if s)
                found[key.split(":", 1)[1]] = np.frombuffer(vec, dtype=np.float32).reshape(dims)
        self.hits += len(found)
        self.misses += len(digests) - len(found)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        rows = [
            (
                self._key(d),
                ",".join(str(s) for s in v.shape),
                np.ascontiguousarray(v, dtype=np.float32).tobytes(),
            )
            for d, v in items.items()
        ]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO feats VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM feats WHERE key LIKE ?", (f"{self.tower_id}:%",)
        ).fetchone()[0]

    def cached_apply(self, fn, x: Tensor) -> Tensor:
        """`fn(x)` row by row through the cache: computes only rows never seen, in one batch."""
        digests = [tensor_digest(row) for row in x]
        found = self.get_many(digests)
        missing = [i for i, d in enumerate(digests) if d not in found]
        if missing:
            out = fn(x[missing]).detach().float().cpu().numpy()
            new = {digests[i]: out[j] for j, i in enumerate(missing)}
            self.put_many(new)
            found.update(new)
        return torch.from_numpy(np.stack([found[d] for d in digests]))
