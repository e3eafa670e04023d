"""CLIP-CID image semantic balance (Yang, Gu et al., AAAI 2025; docs/methods.md section 4.1).

1. Top-k neighbours of every image, chunked (`clipdistill.curate.knn`), pairs closer than beta.
2. Union-find over the pairs (strictly `d < beta`; undirected) -> groups (connected components).
3. In each group keep the member nearest the group centroid (mean of the normalised embeddings, not
   re-normalised; ties, meaning squared distances within `TIE_TOL`, go to the smaller row); singletons
   are kept.

`target_keep` picks beta by bisection over the pair distances for a requested kept fraction. Sharded
mode (inside `torchrun`, gloo): rank 0 trains the projection and quantizer and broadcasts them, every
rank builds the index of all N and searches its slice of the queries, writes its pair list under
`out_dir/pairs/`, and rank 0 merges them with union-find and writes the outputs.

Outputs in `out_dir`: `stats.json`, plots, optionally `pairs.npz`, and last `keep.txt` (the keys of kept
samples, one per line, written atomically: an interrupted run leaves no keep-list). Read it with
`load_keep_list` and pass the set as `keys=` to `clipdistill.data.shards.iter_samples`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse

from clipdistill.curate.io import Embeddings, save_npz_atomic, write_json_atomic, write_lines_atomic
from clipdistill.curate.knn import NeighbourSearch, Pairs, SearchConfig
from clipdistill.errors import UserError

log = logging.getLogger(__name__)

# Squared distances to the centroid this close count as a tie (float64 rounding is ~1e-16).
TIE_TOL = 1e-12
KEEP_LIST = "keep.txt"


@dataclass
class BalanceConfig:
    """beta, or target_keep, or only a sweep (a kept-fraction table, no keep-list)."""

    beta: float | None = None
    target_keep: float | None = None
    sweep: tuple[float, ...] = ()
    search: SearchConfig = field(default_factory=SearchConfig)
    save_pairs: bool = False
    plots: bool = True
    max_rounds: int = 6  # target_keep: searches with a 1.25x wider radius while the target is not reached

    def validate(self) -> None:
        if self.beta is not None and self.target_keep is not None:
            raise UserError("give either beta or target_keep, not both")
        if self.beta is None and self.target_keep is None and not self.sweep:
            raise UserError("nothing to do: pass --beta B, --target-keep F or --sweep B1,B2,...")
        if self.beta is not None and not 0 < self.beta <= 2:
            raise UserError(
                f"beta {self.beta} is outside (0, 2], the range of distances between unit vectors"
            )
        if self.target_keep is not None and not 0 < self.target_keep <= 1:
            raise UserError(f"target_keep {self.target_keep} must be a fraction in (0, 1], e.g. 0.56")
        if any(not 0 < b <= 2 for b in self.sweep):
            raise UserError(f"sweep values {list(self.sweep)} must lie in (0, 2]")


@dataclass
class BalanceResult:
    n: int
    beta: float | None
    labels: np.ndarray  # component root (its smallest row) of every row
    keep: np.ndarray | None  # bool mask of kept rows
    pairs: Pairs
    stats: dict


# -- union-find ---------------------------------------------------------------------------------
def connected_components(
    n: int, i: np.ndarray, j: np.ndarray, parent: np.ndarray | None = None
) -> np.ndarray:
    """Union-find over edges (i, j): the root (smallest member) of every node's component.

    Vectorised hook-and-compress: each round hooks the larger root of every edge between two
    components onto the smaller one, then compresses paths. Pointers only decrease, so no cycles.
    `parent` continues from an earlier result (a fully compressed forest).
    """
    parent = np.arange(n, dtype=np.int64) if parent is None else parent.copy()
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while len(i):
        ri, rj = parent[i], parent[j]
        m = ri != rj
        if not m.any():
            break
        i, j, ri, rj = i[m], j[m], ri[m], rj[m]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


def _summary(labels: np.ndarray) -> dict:
    sizes = np.bincount(labels, minlength=len(labels))
    sizes = sizes[sizes > 0]
    hist = np.bincount(sizes)
    return {
        "kept": len(sizes),
        "kept_fraction": len(sizes) / len(labels),
        "groups": int((sizes > 1).sum()),
        "grouped_samples": int(sizes[sizes > 1].sum()),
        "largest_group": int(sizes.max()),
        "group_size_histogram": {str(s): int(c) for s, c in enumerate(hist) if c},
    }


def kept_curve(n: int, pairs: Pairs, betas: list[float] | np.ndarray) -> list[dict]:
    """Kept fraction (= number of groups, singletons included, / n) at each beta, incrementally."""
    order = np.argsort(pairs.d, kind="stable")
    d, i, j = pairs.d[order], pairs.i[order], pairs.j[order]
    rows, parent, done = [], None, 0
    for beta in sorted(betas):
        upto = int(np.searchsorted(d, beta, side="left"))
        parent = connected_components(n, i[done:upto], j[done:upto], parent)
        done = upto
        kept = int(np.count_nonzero(parent == np.arange(n)))
        rows.append({"beta": float(beta), "kept": kept, "kept_fraction": kept / n, "pairs": upto})
    return rows


def beta_for_keep(n: int, pairs: Pairs, target: float) -> tuple[float, float]:
    """Bisection over the sorted pair distances for the beta whose kept fraction is nearest `target`.

    Returns (beta, kept fraction). When even all pairs keep more than `target`, that is the
    largest beta the pairs allow (the caller then widens the search radius).
    """
    d_sorted = np.sort(pairs.d)
    order = np.argsort(pairs.d, kind="stable")
    i, j = pairs.i[order], pairs.j[order]
    if not len(d_sorted):
        return 0.0, 1.0
    u = np.unique(d_sorted)
    betas = np.r_[u, np.nextafter(u[-1], np.inf)]  # betas[t] admits every pair below it
    cut = np.searchsorted(d_sorted, betas, side="left")

    def frac(parent: np.ndarray) -> float:
        return np.count_nonzero(parent == np.arange(n)) / n

    lo, base = 0, np.arange(n, dtype=np.int64)  # betas[0] admits no pair: fraction 1
    hi = len(betas) - 1
    top = connected_components(n, i, j)
    if frac(top) > target:
        return float(betas[hi]), frac(top)
    f_lo, f_hi = 1.0, frac(top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p_mid = connected_components(n, i[cut[lo] : cut[mid]], j[cut[lo] : cut[mid]], base)
        f_mid = frac(p_mid)
        if f_mid > target:
            lo, base, f_lo = mid, p_mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    if abs(f_lo - target) < abs(f_hi - target):
        return float(betas[lo]), f_lo
    return float(betas[hi]), f_hi


# -- keep selection ----------------------------------------------------------------------------
def select_keep(emb: Embeddings, labels: np.ndarray, block: int = 65536) -> np.ndarray:
    """Bool mask: singletons, and in each group the member nearest the group centroid (docs/methods.md section 4.1 step 3)."""
    n = len(labels)
    sizes = np.bincount(labels, minlength=n)[labels]
    keep = sizes == 1
    members = np.flatnonzero(sizes > 1)
    members = members[np.argsort(labels[members], kind="stable")]  # by group, then by row
    if not len(members):
        return keep
    starts = np.r_[0, np.flatnonzero(np.diff(labels[members])) + 1]
    ends = np.r_[starts[1:], len(members)]
    g = 0
    while g < len(starts):
        h = max(g + 1, int(np.searchsorted(ends, starts[g] + block, side="right")))
        a, b = starts[g], ends[h - 1]
        if h == g + 1 and b - a > block:
            d2 = _big_group_d2(emb, members[a:b], block)
            seg = np.zeros(1, np.int64)
        else:
            x = emb.rows(members[a:b]).astype(np.float64)
            seg = starts[g:h] - a
            counts = np.diff(np.r_[seg, b - a])
            # Segment sums as a sparse 0/1 matrix product: much faster than reduceat along axis 0.
            ones = scipy.sparse.csr_matrix(
                (np.ones(b - a), np.arange(b - a), np.r_[seg, b - a]), shape=(len(seg), b - a)
            )
            centroids = (ones @ x) / counts[:, None]
            diff = x - np.repeat(centroids, counts, axis=0)
            d2 = np.einsum("ij,ij->i", diff, diff)
        counts = np.diff(np.r_[seg, len(d2)])
        near = d2 <= np.repeat(np.minimum.reduceat(d2, seg), counts) + TIE_TOL
        gid = np.repeat(np.arange(len(seg)), counts)
        pos = np.flatnonzero(near)
        first = pos[np.r_[True, gid[pos][1:] != gid[pos][:-1]]]  # smallest row among the nearest
        keep[members[a + first]] = True
        g = h
    return keep


def _big_group_d2(emb: Embeddings, rows: np.ndarray, block: int) -> np.ndarray:
    total = np.zeros(emb.dim)
    for s in range(0, len(rows), block):
        total += emb.rows(rows[s : s + block]).astype(np.float64).sum(0)
    centroid = total / len(rows)
    out = np.empty(len(rows))
    for s in range(0, len(rows), block):
        diff = emb.rows(rows[s : s + block]).astype(np.float64) - centroid
        out[s : s + block] = np.einsum("ij,ij->i", diff, diff)
    return out


def load_keep_list(path: str | Path) -> set[str]:
    """Keys of a keep-list written by `balance`, for `iter_samples(..., keys=...)`."""
    path = Path(path)
    if path.is_dir():
        path = path / KEEP_LIST
    if not path.is_file():
        raise UserError(f"keep-list '{path}' not found; run `clipdistill balance ... --out DIR` first")
    return set(path.read_text(encoding="utf-8").splitlines())


# -- distributed helpers -----------------------------------------------------------------------
def init_sharding_from_env() -> tuple[int, int]:
    """Join the torchrun process group (gloo) when WORLD_SIZE > 1; returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_sharding() -> None:
    """Leave the process group joined by `init_sharding_from_env` (no-op when there is none)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _dist() -> tuple[int, int]:
    if "torch" not in sys.modules:  # no process group can exist; spare the torch import (seconds, ~300 MB)
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj: object, world: int) -> object:
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _merge_pairs(n: int, found: tuple, rank: int, world: int, out_dir: Path | None) -> Pairs | None:
    """Rank 0 gets the union of every rank's pairs (through files in `out_dir/pairs`)."""
    if world == 1:
        return Pairs.from_directed(n, *found)
    shard_dir = out_dir / "pairs"
    name = "rank{:05d}-of-{:05d}.npz"
    save_npz_atomic(shard_dir / name.format(rank, world), q=found[0], j=found[1], d=found[2])
    _barrier(world)
    if rank != 0:
        return None
    parts = []
    for r in range(world):
        with np.load(shard_dir / name.format(r, world)) as z:
            parts.append(Pairs(z["q"], z["j"], z["d"]))
    for r in range(world):
        (shard_dir / name.format(r, world)).unlink()
    return Pairs.concat(n, parts)


# -- the pipeline ------------------------------------------------------------------------------
def balance(emb: Embeddings, cfg: BalanceConfig, out_dir: str | Path | None = None) -> BalanceResult | None:
    """Run semantic balance; writes outputs to `out_dir` when given. Ranks other than 0 return None."""
    cfg.validate()
    rank, world = _dist()
    out = Path(out_dir) if out_dir is not None else None
    if world > 1 and out is None:
        raise UserError("sharded balance needs --out DIR on a filesystem shared by every rank")
    n, clock, seconds = len(emb), time.perf_counter(), {}
    if rank == 0 and out is not None and (out / KEEP_LIST).exists():
        # A keep-list must come from the run whose stats sit beside it: drop the old one first.
        log.info("removing the keep-list of an earlier run in %s", out)
        (out / KEEP_LIST).unlink()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    search = NeighbourSearch(emb, cfg.search)
    search.load_state(_broadcast(search.train() if rank == 0 else None, world))
    lap("train")
    lo, hi = n * rank // world, n * (rank + 1) // world
    search.build(lo, hi)
    lap("build")
    betas = sorted(set(cfg.sweep) | ({cfg.beta} if cfg.beta is not None else set()))
    if betas:
        radius = max(betas)
    elif search.kind == "flat":
        radius = 2.0  # every top-k pair: bisection over their distances (docs/methods.md section 4.1)
    else:
        radius = _initial_radius(search, cfg.target_keep) if rank == 0 else None
    radius = _broadcast(radius, world)
    beta, calib, pairs, searched = cfg.beta, {}, None, radius
    for _ in range(cfg.max_rounds):
        calib = search.calibrate(radius) if rank == 0 else {}
        search.param = _broadcast(search.param, world)
        lap("calibrate")
        pairs = _merge_pairs(n, search.search(np.arange(lo, hi), radius), rank, world, out)
        searched = radius
        lap("search")
        wider = None
        if rank == 0 and cfg.target_keep is not None:
            beta, frac = beta_for_keep(n, pairs, cfg.target_keep)
            if frac > cfg.target_keep + 0.5 / n and radius < 2.0:
                wider = min(2.0, radius * 1.25)
                log.info(
                    "kept fraction %.4f > target at radius %.4g; searching again at %.4g", frac, radius, wider
                )
        wider = _broadcast(wider, world)
        if wider is None:
            break
        radius = wider
        search.param = cfg.search.nprobe if search.kind == "ivf" else cfg.search.ef_search
    else:
        if rank == 0 and cfg.target_keep is not None:
            log.warning(
                "target kept fraction %.3g not reached after %d searches; using beta %.4g",
                cfg.target_keep,
                cfg.max_rounds,
                beta,
            )
    if rank != 0:
        _barrier(world)
        return None
    result = _finish(emb, cfg, out, pairs, beta, searched, search, calib, seconds, lap, world)
    _barrier(world)
    return result


def _initial_radius(search: NeighbourSearch, target: float) -> float:
    """A first radius for `target_keep`, from the sample's nearest-neighbour distances F.

    The samples removed at beta are at most those with a neighbour under beta, so the target's
    beta is at least F^-1(1 - target); start just above that and widen if needed.
    """
    nn = np.sort(search.nearest_distances(search.sample_ids()))
    at = min(len(nn) - 1, math.ceil((1.0 - target) * len(nn)))
    return float(min(2.0, nn[at] * 1.1 + 1e-6))


def _finish(emb, cfg, out, pairs, beta, radius, search, calib, seconds, lap, world) -> BalanceResult:
    n = len(emb)
    curve_betas = sorted(
        set(cfg.sweep) | ({beta} if beta else set()) | set(np.linspace(0, radius, 21)[1:].tolist())
    )
    curve = kept_curve(n, pairs, curve_betas)
    if search.cal_found is not None:
        for row in curve:
            m = search.cal_d < row["beta"]
            row["sample_recall"] = float(search.cal_found[m].mean()) if m.any() else None
    lap("sweep")
    stats: dict = {"n": n, "dim": emb.dim, "beta": beta, "target_keep": cfg.target_keep}
    labels, keep = np.arange(n), None
    if beta is not None:
        under = pairs.under(beta)
        labels = connected_components(n, under.i, under.j)
        lap("union_find")
        keep = select_keep(emb, labels)
        lap("select")
        stats.update(_summary(labels), pairs_under_beta=len(under))
    stats["search"] = {
        "index": search.kind,
        "k": cfg.search.k,
        "pca": search.pca,
        "radius": radius,
        "world_size": world,
        **({"nlist": search.nlist} if search.kind == "ivf" else {}),
        **calib,
        "config": asdict(cfg.search),
    }
    stats["sweep"] = [r for r in curve if r["beta"] in set(cfg.sweep) or r["beta"] == beta] or curve
    stats["curve"] = curve
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.save_pairs:
            save_npz_atomic(out / "pairs.npz", i=pairs.i, j=pairs.j, d=pairs.d)
        if cfg.plots:
            from clipdistill.curate.plots import plot_kept_vs_beta, plot_size_distribution

            plot_kept_vs_beta(curve, out / "kept_vs_beta.png", beta=beta, target=cfg.target_keep)
            if beta is not None:
                plot_size_distribution(stats["group_size_histogram"], out / "group_sizes.png", what="group")
        seconds["total"] = round(sum(seconds.values()), 3)
        stats["seconds"] = seconds
        write_json_atomic(out / "stats.json", stats)
        if keep is not None:
            write_lines_atomic(out / KEEP_LIST, (k for k, kept in zip(emb.iter_keys(), keep) if kept))
            lap("write")
    stats["seconds"] = seconds
    return BalanceResult(n=n, beta=beta, labels=labels, keep=keep, pairs=pairs, stats=stats)
