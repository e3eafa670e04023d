"""Datasets: webdataset shard readers, recorded augmentations, teacher caches."""
