"""`clipdistill balance` and `clipdistill cluster`: CLIP-CID data curation (docs/methods.md sections 4.1-4.2).

clipdistill balance --embeddings E.npz --beta 0.3 --out runs/balance
clipdistill balance --embeddings E.npy --keys E.keys.txt --target-keep 0.56 --out runs/balance
clipdistill balance --embeddings E.npz --sweep 0.1,0.2,0.3,0.4 --out runs/sweep   # table only
torchrun --nproc_per_node 2 -m clipdistill.cli.main balance ... --out SHARED_DIR     # sharded
clipdistill cluster --embeddings E.npz --k 200 --out runs/clusters
"""

from __future__ import annotations

import argparse
import logging
import os

from clipdistill.errors import UserError


def _floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a comma-separated list of numbers, e.g. 0.1,0.2,0.3"
        ) from None


def _passive_openmp() -> None:
    # faiss's OpenMP threads spin while waiting; on a shared, oversubscribed CPU that cost 2-3x in
    # our measurements. Takes effect only if faiss is not imported yet; the user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: noise here


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "balance", help="semantic balance: drop near-duplicate images, keep one per group (CLIP-CID)"
    )
    b.add_argument(
        "--embeddings",
        required=True,
        help=".npy (memory-mapped, with a keys file), .npz (embeddings, keys) or a directory",
    )
    b.add_argument(
        "--keys",
        default=None,
        help="keys text file for an .npy (default: <stem>.keys.txt or keys.txt beside it)",
    )
    what = b.add_mutually_exclusive_group()
    what.add_argument(
        "--beta", type=float, default=None, help="join pairs closer than this (Euclidean on unit vectors)"
    )
    what.add_argument(
        "--target-keep", type=float, default=None, help="choose beta for this kept fraction, e.g. 0.56"
    )
    b.add_argument(
        "--sweep", type=_floats, default=(), help="print the kept fraction at these betas, e.g. 0.1,0.2,0.3"
    )
    b.add_argument("--out", required=True, help="output directory: keep.txt, stats.json, plots")
    b.add_argument("--index", default="auto", help="auto (flat up to 50k rows, else ivf), flat, ivf or hnsw")
    b.add_argument("--k", type=int, default=16, help="neighbours per image (0 = every pair under beta)")
    b.add_argument("--pca", type=int, default=None, help="projected dims for ivf/hnsw (default 64; 0 = off)")
    b.add_argument("--nlist", type=int, default=None, help="ivf cells (default 2 sqrt(N))")
    b.add_argument(
        "--nprobe", type=int, default=None, help="ivf cells probed (default: calibrated for --recall)"
    )
    b.add_argument("--ef-search", type=int, default=None, help="hnsw search depth (default: calibrated)")
    b.add_argument(
        "--recall", type=float, default=0.99, help="calibration target on sampled pairs (default 0.99)"
    )
    b.add_argument("--sample", type=int, default=2000, help="calibration queries (default 2000)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--save-pairs", action="store_true", help="also write pairs.npz (i, j, distance)")
    b.add_argument("--no-plots", action="store_true")
    b.set_defaults(handler=_balance)

    c = sub.add_parser("cluster", help="spherical k-means pseudo-labels for the cluster loss term (CLIP-CID)")
    c.add_argument(
        "--embeddings", required=True, help=".npy (with a keys file), .npz (embeddings, keys) or a directory"
    )
    c.add_argument("--keys", default=None)
    c.add_argument("--k", type=int, required=True, help="number of clusters (the recipe's cluster K)")
    c.add_argument("--out", required=True, help="output directory: centres.npy, labels.npz, stats.json, plot")
    c.add_argument("--niter", type=int, default=20)
    c.add_argument(
        "--max-points-per-centroid", type=int, default=256, help="training sample size per cluster"
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-plots", action="store_true")
    c.set_defaults(handler=_cluster)


def _balance(args: argparse.Namespace) -> int:
    _passive_openmp()
    from clipdistill.curate.balance import BalanceConfig, balance, init_sharding_from_env, shutdown_sharding
    from clipdistill.curate.io import load_embeddings
    from clipdistill.curate.knn import SearchConfig

    if not 0 < args.recall <= 1:
        raise UserError(f"--recall {args.recall} must be a fraction in (0, 1], e.g. 0.99")
    search = SearchConfig(
        index=args.index,
        k=args.k,
        pca=args.pca,
        nlist=args.nlist,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        recall=args.recall,
        sample=args.sample,
        seed=args.seed,
    )
    cfg = BalanceConfig(
        beta=args.beta,
        target_keep=args.target_keep,
        sweep=args.sweep,
        search=search,
        save_pairs=args.save_pairs,
        plots=not args.no_plots,
    )
    cfg.validate()
    _, world = init_sharding_from_env()
    try:
        result = balance(load_embeddings(args.embeddings, args.keys), cfg, args.out)
    finally:
        shutdown_sharding()
    if result is None:
        return 0
    stats = result.stats
    s = stats["search"]
    extra = (
        f", nprobe {s['nprobe']}"
        if "nprobe" in s
        else f", ef_search {s['ef_search']}"
        if "ef_search" in s
        else ""
    )
    recall = s.get("sample_recall")
    print(
        f"{stats['n']} samples, index {s['index']} (k {s['k']}, pca {s['pca'] or 'off'}{extra}; "
        f"sampled pair recall {'n/a' if recall is None else f'{100 * recall:.1f}%'}), {world} rank(s)"
    )
    rows = stats["sweep"]
    if args.sweep:
        print(f"{'beta':>8} {'kept':>10} {'kept_frac':>10} {'pairs':>10} {'recall':>8}")
        for r in rows:
            rec = r.get("sample_recall")
            print(
                f"{r['beta']:8.4f} {r['kept']:10d} {r['kept_fraction']:10.4f} {r['pairs']:10d} "
                f"{'-' if rec is None else f'{100 * rec:.1f}%':>8}"
            )
    if result.beta is not None:
        print(
            f"beta {result.beta:.4f}: kept {stats['kept']} of {stats['n']} ({100 * stats['kept_fraction']:.2f}%), "
            f"{stats['groups']} groups of >1 (largest {stats['largest_group']}); keep-list {args.out}/keep.txt"
        )
    print(f"stats: {args.out}/stats.json ({stats['seconds'].get('total', 0):.1f} s)")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    _passive_openmp()
    from clipdistill.curate.cluster import ClusterConfig, cluster
    from clipdistill.curate.io import load_embeddings

    cfg = ClusterConfig(
        k=args.k,
        niter=args.niter,
        seed=args.seed,
        max_points_per_centroid=args.max_points_per_centroid,
        plots=not args.no_plots,
    )
    result = cluster(load_embeddings(args.embeddings, args.keys), cfg, args.out)
    st = result.stats
    print(
        f"{st['n']} samples -> {st['k']} clusters: largest {st['largest_cluster']}, median {st['median_cluster']:.0f}, "
        f"empty {st['empty_clusters']}, mean cosine to centre {st['mean_cosine_to_centre']:.3f}; "
        f"wrote {args.out}/centres.npy, labels.npz ({st['seconds']:.1f} s)"
    )
    return 0
