"""Retrieval recall@k (spec section 10): a hand-computed case with known ranks, a loop reference,
a perfect and a shuffled model, CLIP_benchmark's names and directions."""

from __future__ import annotations

import pytest
import torch
from fake_clip import caption_index, lookup_model, one_hot

from clipdistill.eval import runner
from clipdistill.eval.retrieval import retrieval_metrics

# scores[i, t]: image i x text t. Texts 0,1 belong to image 0; 2,3 to image 1; 4,5 to image 2.
SCORES = 0.5 * torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.4, 0.3, 0.2],  # image 0: own text 0 ranks 1st
        [0.5, 0.6, 0.1, 0.2, 0.3, 0.4],  # image 1: own texts rank 6th and 5th
        [0.2, 0.3, 0.45, 0.15, 0.35, 0.05],  # image 2: own text 4 ranks 2nd
    ]
)
OWNER = [0, 0, 1, 1, 2, 2]


def _embeddings_with_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text vectors whose dot products are exactly `scores` (one spare dimension)."""
    n_img = scores.shape[0]
    images = torch.cat([torch.eye(n_img), torch.zeros(n_img, 1)], dim=1)
    spare = (1 - scores.pow(2).sum(0)).sqrt().unsqueeze(1)
    return images, torch.cat([scores.T, spare], dim=1)


def test_hand_computed_ranks():
    images, texts = _embeddings_with_scores(SCORES)
    torch.testing.assert_close(images @ texts.T, SCORES)
    m = retrieval_metrics(images, texts, OWNER, ks=(1, 2, 5, 10))
    # image -> text: best own-caption ranks 1, 5, 2
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@5"] == pytest.approx(1.0)
    assert m["text_retrieval_recall@10"] == pytest.approx(1.0)
    # text -> image: rank of the own image per text: 1, 3, 3, 2, 1, 3
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 6)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 6)
    assert m["image_retrieval_recall@5"] == pytest.approx(1.0)  # k beyond the 3 images counts all


def _reference(scores: torch.Tensor, owner: list[int], k: int) -> tuple[float, float]:
    """Loops over ranks, in float64: (image -> text, text -> image) recall@k."""
    s = scores.double()
    i2t = []
    for i in range(s.shape[0]):
        ranks = [int((s[i] > s[i, t]).sum()) + 1 for t in range(s.shape[1]) if owner[t] == i]
        i2t.append(min(ranks) <= k)
    t2i = [int((s[:, t] > s[owner[t], t]).sum()) + 1 <= k for t in range(s.shape[1])]
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def test_matches_a_loop_reference_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(30, 8, generator=g)
    texts = torch.randn(150, 8, generator=g)
    owner = [t // 5 for t in range(150)]
    m = retrieval_metrics(images, texts, owner)
    scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    for k in (1, 5, 10):
        i2t, t2i = _reference(scores, owner, k)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)


def test_random_embeddings_score_about_chance():
    g = torch.Generator().manual_seed(1)
    n = 200
    m = retrieval_metrics(
        torch.randn(n, 64, generator=g),
        torch.randn(5 * n, 64, generator=g),
        [t // 5 for t in range(5 * n)],
        ks=(10,),
    )
    assert m["image_retrieval_recall@10"] == pytest.approx(10 / n, abs=0.03)
    # 5 captions per image among 1,000 texts: P(one in top 10) = 1 - C(995,10)/C(1000,10) ~ 0.049
    assert m["text_retrieval_recall@10"] == pytest.approx(0.049, abs=0.035)


def test_bad_index_is_rejected():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), [0, 1, 2])


def test_perfect_model_retrieves_everything(make_dataset):
    root = make_dataset("caps", kind="retrieval", n=12, no_caption=(4,))
    model = lookup_model(root, "caps", lambda i, s: one_hot(int(s.key[1:]), 12), caption_index, 12)
    rec = runner.evaluate(model, "caps", data_root=root, batch_size=5, progress=False)
    assert rec["task"] == "zeroshot_retrieval"
    assert set(rec["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in rec["metrics"].values())
    assert rec["clipdistill"]["samples"] == 11 and rec["clipdistill"]["skipped"] == 1


def test_wrong_captions_score_zero_at_1(make_dataset):
    root = make_dataset("caps", kind="retrieval", n=6)
    # every image embeds as the next sample's captions: never its own at rank 1, always within 2
    model = lookup_model(
        root, "caps", lambda i, s: one_hot((i + 1) % 6, 6) + 0.5 * one_hot(i, 6), caption_index, 6
    )
    m = runner.evaluate(model, "caps", data_root=root, progress=False)["metrics"]
    assert m["text_retrieval_recall@1"] == 0.0 and m["image_retrieval_recall@1"] == 0.0
    assert m["text_retrieval_recall@5"] == 1.0 and m["image_retrieval_recall@5"] == 1.0
