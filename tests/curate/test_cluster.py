"""Spherical k-means pseudo-labels (spec 4.2): planted clusters recovered, unit centres, labels are the
nearest centre by cosine, outputs read back by key, determinism, errors and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from clipdistill.cli.main import main
from clipdistill.curate.cluster import ClusterConfig, cluster, load_pseudo_labels, spherical_kmeans
from clipdistill.curate.io import Embeddings, normalise
from clipdistill.errors import UserError


def planted_clusters(n: int = 600, dim: int = 16, k: int = 5, seed: int = 0, spread: float = 0.15):
    """Rows scattered around k random unit directions (unnormalised: the code must normalise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = centres[truth] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x *= rng.uniform(0.5, 3.0, (n, 1))  # arbitrary norms
    return x.astype(np.float32), truth


def test_planted_clusters_recovered_with_unit_centres_and_nearest_labels():
    x, truth = planted_clusters()
    centres, labels, cosine = spherical_kmeans(Embeddings(x), ClusterConfig(k=5, seed=1, nredo=5))
    assert adjusted_rand_score(truth, labels) == 1.0
    assert np.allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)
    xn = normalise(x).astype(np.float64)
    for i in range(0, len(x), 37):  # nearest centre by cosine, checked row by row
        sims = [float(np.dot(xn[i], c)) for c in centres.astype(np.float64)]
        assert labels[i] == int(np.argmax(sims))
        assert cosine[i] == pytest.approx(max(sims), abs=1e-5)


def test_cluster_writes_outputs_read_back_by_key(tmp_path):
    x, truth = planted_clusters(n=300, k=4, seed=2)
    keys = [f"img{i:04d}" for i in range(len(x))]
    result = cluster(Embeddings(x, keys), ClusterConfig(k=4), tmp_path)
    centres, by_key = load_pseudo_labels(tmp_path)
    assert np.array_equal(centres, result.centres) and centres.shape == (4, 16)
    assert [by_key[k] for k in keys] == result.labels.tolist()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert sum(int(s) * c for s, c in stats["cluster_size_histogram"].items()) == len(x)
    assert stats["empty_clusters"] == 0 and (tmp_path / "cluster_sizes.png").stat().st_size > 1000


def test_deterministic_and_sampled_training():
    x, _ = planted_clusters(n=800, k=8, seed=3)
    cfg = ClusterConfig(k=8, seed=4, max_points_per_centroid=20)  # trains on 160 of 800 rows
    a, b = (spherical_kmeans(Embeddings(x), cfg) for _ in range(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert len(np.unique(a[1])) == 8


def test_errors_and_cli(tmp_path, capsys):
    x, _ = planted_clusters(n=50, k=3, seed=5)
    with pytest.raises(UserError, match="k = 60 clusters for 50 samples"):
        spherical_kmeans(Embeddings(x), ClusterConfig(k=60))
    with pytest.raises(UserError, match="run `clipdistill cluster"):
        load_pseudo_labels(tmp_path / "nothing")
    np.savez(tmp_path / "e.npz", embeddings=x, keys=np.array([f"k{i}" for i in range(len(x))]))
    assert (
        main(["cluster", "--embeddings", str(tmp_path / "e.npz"), "--k", "3", "--out", str(tmp_path / "c")])
        == 0
    )
    assert "3 clusters" in capsys.readouterr().out
    _, by_key = load_pseudo_labels(tmp_path / "c")
    assert set(by_key) == {f"k{i}" for i in range(50)} and set(by_key.values()) == {0, 1, 2}
    assert (
        main(["cluster", "--embeddings", str(tmp_path / "e.npz"), "--k", "99", "--out", str(tmp_path / "d")])
        == 2
    )
