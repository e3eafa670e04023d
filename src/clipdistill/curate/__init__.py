"""Data curation from teacher embeddings (docs/methods.md sections 4.1-4.2): semantic balance and k-means pseudo-labels.

Entry points: `clipdistill.curate.balance.balance` and `clipdistill.curate.cluster.cluster` (not
re-exported here, so that `clipdistill.curate.balance` stays the module).
"""

from clipdistill.curate.balance import BalanceConfig, BalanceResult, connected_components, load_keep_list
from clipdistill.curate.cluster import ClusterConfig, load_pseudo_labels, spherical_kmeans
from clipdistill.curate.io import Embeddings, load_embeddings
from clipdistill.curate.knn import Pairs, SearchConfig

__all__ = [
    "BalanceConfig",
    "BalanceResult",
    "ClusterConfig",
    "Embeddings",
    "Pairs",
    "SearchConfig",
    "connected_components",
    "load_embeddings",
    "load_keep_list",
    "load_pseudo_labels",
    "spherical_kmeans",
]
