"""Fixtures of the engine tests: tiny registered models, a tiny image-caption dataset, a base config."""

from __future__ import annotations

import pytest
import torch
from tiny_models import register


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread per test (two shared cores); process-wide torch settings restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="session")
def tiny():
    register()


@pytest.fixture
def caption_root(make_dataset):
    """A 24-sample image-caption dataset `caps` (train split, 2 shards); returns the data root."""
    return make_dataset("caps", kind="retrieval", n=24, shards=2, split="train")
