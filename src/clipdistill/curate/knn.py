"""Chunked top-k neighbour pairs under a radius, exact or approximate (docs/methods.md section 4.1, step 1).

For every query row q we want its k nearest rows j (Euclidean on L2-normalised vectors) with
distance < radius. Three backends, all returning exact float64 distances:

- `flat`: faiss `IndexFlatIP` on the full vectors, queries in chunks. Exact; O(N^2 D), small N only.
- `ivf`: vectors are first projected by PCA to `pca` dimensions (default 64). An orthonormal
  projection never lengthens a difference vector, so every pair closer than the radius in full
  space is also closer than it in the projected space: the projection makes false candidates,
  never misses. A coarse quantizer (faiss k-means, `nlist` cells) assigns every vector to a cell;
  each query probes its `nprobe` nearest cells. The scan is a self-join done cell by cell (one
  faiss range search per cell: the queries probing the cell against its members, a BLAS matrix
  product), not faiss's per-query list scan. Candidates are then re-checked with exact distances.
  Decision: `nlist` defaults to 2 sqrt(N), not the usual 4 sqrt(N) of docs/methods.md section 4.1:
  with the scan at BLAS speed, the cost N nlist (coarse assignment) + nprobe N^2 / nlist (join) is
  smallest near sqrt(nprobe N), and calibrated nprobe is about 4 on near-duplicates.
- `hnsw`: faiss `IndexHNSWFlat` on the projected vectors, then the same exact re-check.

Recall trade-off: in `ivf`/`hnsw` a pair is missed when neither end probes the other's cell
(`nprobe`) or reaches it in the graph walk (`ef_search`), or when more than `candidates * k`
projected-space candidates crowd it out. Unless given, `nprobe` / `ef_search` are calibrated on a
random sample of queries: their pairs under the radius are found by brute force in the projected
space (exact, by the argument above) and re-checked; the search is then run on the sample and the
setting is raised until at least `recall` of those pairs are found, or until raising it no longer
helps (then a warning says so). The measured sample recall goes into the statistics. `recall=0.99`
(default, the target of docs/methods.md section 4.1) recovered 99.7-99.8% of planted near-duplicate
pairs once union-find adds transitive links (99.1-99.2% as direct neighbour pairs;
benchmarks/balance.py); `recall=1.0` raises the setting until every sampled pair is found, the
setting under which the tests require every planted pair to be recovered.
The top-k cap is part of the definition (docs/methods.md section 4.1); `k=0` removes it (a range search).

Memory: the projected vectors (N x pca float32) and, for ivf, one int64 cell per row plus the
probed cells of this rank's queries (int32).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import faiss
import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits  # comes with scikit-learn
from tqdm import tqdm

from clipdistill.curate.io import Embeddings
from clipdistill.errors import UserError, unknown_name

log = logging.getLogger(__name__)

INDEXES = ("auto", "flat", "ivf", "hnsw")
# Float32 distances in the search are re-checked in float64; this slack keeps boundary pairs.
_SLACK = 1e-3


@dataclass
class SearchConfig:
    """How neighbours are searched. None means "choose": see the module docstring."""

    index: str = "auto"  # auto = flat when N <= exact_below, else ivf
    k: int = 16  # neighbours per query (0 = no cap: every pair under the radius)
    pca: int | None = None  # projected dimensions for ivf/hnsw (None: 64 when D > 64; 0: off)
    nlist: int | None = None  # ivf cells (None: 2 sqrt(N))
    nprobe: int | None = None  # ivf cells probed per query (None: calibrated)
    hnsw_m: int = 32
    ef_search: int | None = None  # hnsw (None: calibrated)
    recall: float = 0.99  # calibration target on the sample's pairs under the radius
    sample: int = 2000  # calibration queries
    candidates: int = 4  # projected-space candidates kept per query and cell = candidates * k
    chunk: int = 32768  # rows per chunk when streaming the embeddings
    exact_below: int = 50_000
    seed: int = 0

    def resolved_index(self, n: int) -> str:
        if self.index not in INDEXES:
            raise unknown_name("index", self.index, INDEXES)
        if self.index == "auto":
            return "flat" if n <= self.exact_below else "ivf"
        return self.index


@dataclass
class Pairs:
    """Undirected pairs i < j (row numbers) with exact distances d, unique."""

    i: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    j: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    d: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    def __len__(self) -> int:
        return len(self.d)

    def under(self, beta: float) -> Pairs:
        m = self.d < beta
        return Pairs(self.i[m], self.j[m], self.d[m])

    @staticmethod
    def from_directed(n: int, q: np.ndarray, j: np.ndarray, d: np.ndarray) -> Pairs:
        lo, hi = np.minimum(q, j).astype(np.int64), np.maximum(q, j).astype(np.int64)
        _, first = np.unique(lo * n + hi, return_index=True)
        return Pairs(lo[first], hi[first], np.asarray(d, np.float64)[first])

    @staticmethod
    def concat(n: int, parts: list[Pairs]) -> Pairs:
        if not parts:
            return Pairs()
        return Pairs.from_directed(n, *(np.concatenate([getattr(p, a) for p in parts]) for a in "ijd"))


def pair_distances(emb: Embeddings, i: np.ndarray, j: np.ndarray, block: int = 32768) -> np.ndarray:
    """Exact float64 Euclidean distances between normalised rows i and j (the definition used everywhere)."""
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), block):
        a = emb.rows(i[s : s + block]).astype(np.float64)
        b = emb.rows(j[s : s + block]).astype(np.float64)
        out[s : s + block] = np.sqrt(np.einsum("ij,ij->i", a - b, a - b))
    return out


def cap_per_query(q: np.ndarray, j: np.ndarray, d: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Keep each query's k nearest (q, j, d) rows (ties by smaller j); k = 0 keeps all."""
    if k <= 0 or len(q) == 0:
        return q, j, d
    order = np.lexsort((j, d, q))
    q, j, d = q[order], j[order], d[order]
    start = np.r_[0, np.flatnonzero(np.diff(q)) + 1]
    rank = np.arange(len(q)) - np.repeat(start, np.diff(np.r_[start, len(q)]))
    keep = rank < k
    return q[keep], j[keep], d[keep]


class NeighbourSearch:
    """`train` (rank 0) -> `load_state` (every rank) -> `build` -> `calibrate` -> `search(rows)`.
    See the module docstring for the backends."""

    def __init__(self, emb: Embeddings, cfg: SearchConfig) -> None:
        self.emb, self.cfg = emb, cfg
        self.n = len(emb)
        self.kind = cfg.resolved_index(self.n)
        if cfg.k < 0:
            raise UserError(f"k must be >= 0, got {cfg.k}; use e.g. --k 16")
        pca = (64 if emb.dim > 64 else 0) if cfg.pca is None else cfg.pca
        self.pca = 0 if self.kind == "flat" or pca >= emb.dim else pca
        self.nlist = max(1, min(cfg.nlist or round(2 * math.sqrt(self.n)), self.n // 4 or 1))
        self.k_cand = (cfg.candidates * cfg.k if cfg.k else 256) + 1  # +1: the query itself
        self.param: int | None = cfg.nprobe if self.kind == "ivf" else cfg.ef_search
        self.mean = self.components = self.centroids = None
        # Calibration sample: exact distances of its pairs and whether the search found each.
        self.cal_d: np.ndarray | None = None
        self.cal_found: np.ndarray | None = None

    # -- training (rank 0), state shared with the other ranks ------------------------------------
    def train(self) -> dict:
        rng = np.random.default_rng(self.cfg.seed)
        if self.pca:
            x = self.emb.rows(np.sort(rng.choice(self.n, min(self.n, 20_000), replace=False)))
            mean = x.mean(0, dtype=np.float64).astype(np.float32)
            x -= mean
            # One BLAS thread: on a busy CPU the threaded 512 x 512 eigensolver took 5-7 s instead of 0.1 s.
            with threadpool_limits(1):
                _, vecs = scipy.linalg.eigh((x.T @ x).astype(np.float64), driver="evd")
            self.mean, self.components = (
                mean,
                np.ascontiguousarray(vecs[:, ::-1][:, : self.pca].T, dtype=np.float32),
            )
        if self.kind == "ivf":
            # 16 points per cell and 10 iterations: rough cells are enough, nprobe is calibrated anyway.
            y = self._project(
                self.emb.rows(np.sort(rng.choice(self.n, min(self.n, 16 * self.nlist), replace=False)))
            )
            km = faiss.Kmeans(
                y.shape[1],
                self.nlist,
                niter=10,
                seed=self.cfg.seed,
                min_points_per_centroid=1,
                max_points_per_centroid=16,
            )
            km.train(y)
            self.centroids = km.centroids.copy()
        return {"mean": self.mean, "components": self.components, "centroids": self.centroids}

    def load_state(self, state: dict) -> None:
        self.mean, self.components, self.centroids = state["mean"], state["components"], state["centroids"]

    def _project(self, x: np.ndarray) -> np.ndarray:
        if not self.pca:
            return x
        return np.ascontiguousarray((x - self.mean) @ self.components.T, dtype=np.float32)

    # -- building ------------------------------------------------------------------------------
    def build(self, start: int = 0, stop: int | None = None) -> None:
        """Project every row (kept in memory: N x dims float32) and build the index; for ivf also
        the cell of every row and the nearest cells of the query rows [start, stop)."""
        stop = self.n if stop is None else stop
        dims = self.pca or self.emb.dim
        self.y = np.empty((self.n, dims), dtype=np.float32)
        for s, x in tqdm(
            self.emb.iter_chunks(self.cfg.chunk),
            total=-(-self.n // self.cfg.chunk),
            desc="project",
            disable=None,
        ):
            self.y[s : s + len(x)] = self._project(x)
        if self.kind == "flat":
            self.index = faiss.IndexFlatIP(dims)
            self.index.add(self.y)
        elif self.kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dims, self.cfg.hnsw_m)
            self.index.add(self.y)
        else:
            self.quantizer = faiss.IndexFlatL2(dims)
            self.quantizer.add(self.centroids)
            # One coarse pass serves the cell assignment and the probes of this rank's queries.
            self.span = (start, stop)
            # Up to 8 probes cached (calibrated nprobe is usually 2-6; a larger one recomputes them).
            self.probes = self._coarse(np.arange(start, stop), min(self.nlist, self.cfg.nprobe or 8))
            self.assign = np.empty(self.n, dtype=np.int64)
            self.assign[start:stop] = self.probes[:, 0]
            for a, b in ((0, start), (stop, self.n)):
                if b > a:
                    self.assign[a:b] = self._coarse(np.arange(a, b), 1)[:, 0]

    def _coarse(self, rows: np.ndarray, p: int) -> np.ndarray:
        out = np.empty((len(rows), p), dtype=np.int32)
        for s in range(0, len(rows), self.cfg.chunk):
            out[s : s + self.cfg.chunk] = self.quantizer.search(self.y[rows[s : s + self.cfg.chunk]], p)[1]
        return out

    def _probes(self, rows: np.ndarray, p: int) -> np.ndarray:
        start, stop = self.span
        if p <= self.probes.shape[1] and len(rows) and rows[0] >= start and rows[-1] < stop:
            return self.probes[rows - start, :p]
        return self._coarse(rows, p)

    def _thr(self, radius: float) -> float:
        return (radius * (1 + _SLACK) + _SLACK) ** 2

    # -- calibration ---------------------------------------------------------------------------
    def sample_ids(self) -> np.ndarray:
        rng = np.random.default_rng(self.cfg.seed + 1)
        return np.sort(rng.choice(self.n, min(self.n, self.cfg.sample), replace=False))

    def truth(self, qids: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Exact pairs (q, j, d) under `radius` for queries `qids`, capped to each query's k nearest;
        also the number before the cap. Brute force on the leading (at most 32) principal components
        (still a contraction, so still a superset of the true pairs), then an exact re-check."""
        dims = min(self.y.shape[1], 32) if self.pca else self.y.shape[1]
        index = faiss.IndexFlatL2(dims)
        index.add(np.ascontiguousarray(self.y[qids, :dims]))
        # Each query keeps its `8 * candidates * k` nearest projected candidates before the exact
        # re-check: this bounds the cost at large radii, where nearly every pair qualifies.
        found = _Accumulator(8 * self.k_cand, limit=max(1 << 24, 16 * self.k_cand * len(qids)))
        for s in range(0, self.n, 1 << 18):
            lims, d2, idx = index.range_search(
                np.ascontiguousarray(self.y[s : s + (1 << 18), :dims]), self._thr(radius)
            )
            rows = s + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
            keep = qids[idx] != rows
            found.add(qids[idx][keep], rows[keep], d2[keep])
        q, j, _ = found.result(final_cap=True)
        d = pair_distances(self.emb, q, j)
        m = d < radius
        q, j, d = q[m], j[m], d[m]
        return (*cap_per_query(q, j, d, self.cfg.k), len(q))

    def nearest_distances(self, qids: np.ndarray) -> np.ndarray:
        """Exact distance of each query in `qids` to its nearest other row (projected-space candidates)."""
        kk = min(self.n, self.k_cand + 1)
        _, idx = faiss.knn(self.y[qids], self.y, kk)
        q, j = np.repeat(qids, kk), idx.ravel()
        ok = (j >= 0) & (j != q)
        d = np.full(len(q), np.inf)
        d[ok] = pair_distances(self.emb, q[ok], j[ok])
        return d.reshape(len(qids), kk).min(1)

    def calibrate(self, radius: float) -> dict:
        """Set nprobe / ef_search for `cfg.recall` of the sample's pairs under `radius`; measure recall."""
        if self.kind == "flat":  # exact: nothing to tune, nothing to measure
            self.cal_d = self.cal_found = None
            return {"sample_recall": 1.0}
        qids = self.sample_ids()
        tq, tj, self.cal_d, n_all = self.truth(qids, radius)
        info: dict = {
            "sample_queries": len(qids),
            "sample_pairs": int(n_all),
            "sample_pairs_within_k": len(tq),
        }
        name = "nprobe" if self.kind == "ivf" else "ef_search"
        if len(tq) == 0:
            self.param = self.param or (8 if self.kind == "ivf" else 4 * self.k_cand)
            log.warning(
                "no pairs under radius %.4g in the calibration sample; using %s = %d",
                radius,
                name,
                self.param,
            )
            info[name] = self.param
            self.cal_found = np.zeros(0, dtype=bool)
            info["sample_recall"] = None
            return info
        fixed = self.param is not None
        limit = self.nlist if self.kind == "ivf" else 4096
        if not fixed and self.kind == "ivf":
            # First guess: a pair is found when either end probes the other's cell.
            cell_q, cell_j = self.assign[tq], self.assign[tj]
            ranks = np.minimum(self._cell_rank(tq, cell_j), self._cell_rank(tj, cell_q))
            self.param = int(np.sort(ranks)[max(1, math.ceil(self.cfg.recall * len(ranks))) - 1]) + 1
        elif not fixed:
            self.param = self.k_cand
        rows = np.union1d(qids, tj)
        found, prev = self._found(rows, radius, tq, tj), None
        while not fixed and found.mean() < self.cfg.recall and self.param < limit:
            if prev is not None and found.mean() - prev[1].mean() < 0.002:
                self.param, found = prev  # raising it did not help: the candidate cap limits recall
                break
            prev = (self.param, found)
            self.param = min(limit, self.param * 2)
            found = self._found(rows, radius, tq, tj)
        self.cal_found = found
        info["sample_recall"], info[name] = float(found.mean()), self.param
        if found.mean() < self.cfg.recall:
            log.warning(
                "sample recall %.4f is below the target %.3g at %s = %d; try --pca 0 or --index flat",
                found.mean(),
                self.cfg.recall,
                name,
                self.param,
            )
        return info

    def _found(self, rows: np.ndarray, radius: float, tq: np.ndarray, tj: np.ndarray) -> np.ndarray:
        q, j, _ = self.search(rows, radius)
        hit = q * self.n + j
        return np.isin(tq * self.n + tj, hit) | np.isin(tj * self.n + tq, hit)

    def _cell_rank(self, rows: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Rank of cell `cells[t]` among all cells by distance from row `rows[t]` (0 = nearest)."""
        out = np.empty(len(rows), dtype=np.int64)
        c2 = (self.centroids * self.centroids).sum(1)
        for s in range(0, len(rows), 4096):
            d2 = c2[None, :] - 2 * self.y[rows[s : s + 4096]] @ self.centroids.T
            own = d2[np.arange(len(d2)), cells[s : s + 4096]]
            out[s : s + 4096] = (d2 < own[:, None]).sum(1)
        return out

    # -- search --------------------------------------------------------------------------------
    def search(self, rows: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Directed (q, j, d) for query rows `rows` (sorted): each query's k nearest with exact d < radius."""
        if self.kind == "ivf":
            q, j = self._join_ivf(rows, radius)
        else:
            qs, js = [], []
            if self.kind == "hnsw":
                self.index.hnsw.efSearch = self.param or 4 * self.k_cand
            for s in tqdm(range(0, len(rows), self.cfg.chunk), desc=f"search {self.kind}", disable=None):
                ids = rows[s : s + self.cfg.chunk]
                a, b = (
                    self._candidates_hnsw(ids, radius)
                    if self.kind == "hnsw"
                    else self._candidates_flat(ids, radius)
                )
                qs.append(a)
                js.append(b)
            q, j = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (qs, js))
        d = pair_distances(self.emb, q, j)
        m = d < radius
        return cap_per_query(q[m], j[m], d[m], self.cfg.k)

    def _filter(self, ids: np.ndarray, dist2: np.ndarray, idx: np.ndarray, radius: float):
        q, j, d2 = np.repeat(ids, idx.shape[1]), idx.ravel(), dist2.ravel()
        m = (j >= 0) & (j != q) & (d2 < self._thr(radius))
        return q[m], j[m]

    def _candidates_flat(self, ids: np.ndarray, radius: float):
        if self.cfg.k == 0:  # no cap: a range search
            lims, _, idx = self.index.range_search(self.y[ids], 1.0 - self._thr(radius) / 2.0)
            q = np.repeat(ids, np.diff(lims.astype(np.int64)))
            return q[q != idx], idx[q != idx]
        ip, idx = self.index.search(self.y[ids], min(self.n, self.cfg.k + 1))
        return self._filter(ids, 2.0 - 2.0 * ip, idx, radius)

    def _candidates_hnsw(self, ids: np.ndarray, radius: float):
        d2, idx = self.index.search(self.y[ids], min(self.n, self.k_cand))
        return self._filter(ids, d2, idx, radius)

    def _join_ivf(self, rows: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        p = min(self.param or 8, self.nlist)
        probes = self._probes(rows, p).ravel()
        members = np.argsort(self.assign, kind="stable")
        m_start = np.r_[0, np.cumsum(np.bincount(self.assign, minlength=self.nlist))]
        probe_q = np.repeat(rows, p)[np.argsort(probes, kind="stable")]
        q_start = np.r_[0, np.cumsum(np.bincount(probes, minlength=self.nlist))]
        thr, cap = self._thr(radius), self.k_cand
        found = _Accumulator(cap, limit=max(1 << 25, 4 * cap * len(rows)))
        for cell in tqdm(range(self.nlist), desc="search ivf", disable=None, mininterval=5):
            mem = members[m_start[cell] : m_start[cell + 1]]
            cell_q = probe_q[q_start[cell] : q_start[cell + 1]]
            if not len(mem) or not len(cell_q):
                continue
            index = faiss.IndexFlatL2(self.y.shape[1])
            index.add(self.y[mem])
            yq = self.y[cell_q]
            lims, d2, idx = index.range_search(yq, thr)
            counts = np.diff(lims.astype(np.int64))
            heavy = counts > cap
            if heavy.any():  # queries with too many candidates in this cell keep their `cap` nearest
                light = ~np.repeat(heavy, counts)
                found.add(np.repeat(cell_q, counts)[light], mem[idx[light]], d2[light])
                hd2, hidx = index.search(yq[heavy], cap)
                hq, hd2, hidx = np.repeat(cell_q[heavy], cap), hd2.ravel(), hidx.ravel()
                ok = (hidx >= 0) & (hd2 < thr)
                found.add(hq[ok], mem[hidx[ok]], hd2[ok])
            else:
                found.add(np.repeat(cell_q, counts), mem[idx], d2)
        q, j, _ = found.result()
        keep = q != j
        return q[keep], j[keep]


class _Accumulator:
    """Directed candidates (q, j, d2), compacted to each query's `cap` nearest when they pile up."""

    def __init__(self, cap: int, limit: int) -> None:
        self.cap, self.limit, self.size = cap, limit, 0
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, q: np.ndarray, j: np.ndarray, d2: np.ndarray) -> None:
        if len(q):
            self.parts.append((q, j, d2))
            self.size += len(q)
        if self.size > self.limit:
            self.parts = [self.result()]
            self.size = len(self.parts[0][0])

    def result(self, final_cap: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        q, j, d2 = (np.concatenate(x) for x in zip(*self.parts))
        return cap_per_query(q, j, d2, self.cap) if final_cap or self.size > self.limit else (q, j, d2)
