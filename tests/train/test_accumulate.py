"""GradCache accumulation over k micro-batches gives the gradients of one big batch (contrastive terms
see every negative), replays each micro-batch's randomness, and applies a shared scale's gradient once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.losses._functional import contrastive_ce
from clipdistill.train.accumulate import cached_backward


class _Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 5))
        self.txt = nn.Linear(4, 5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        return {"image": self.img(x), "text": self.txt(t), "scale": self.logit_scale.exp()}


def _data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)


def _loss(head: nn.Module):
    def fn(s):
        logits = s["scale"] * F.normalize(head(s["image"]), dim=-1) @ F.normalize(s["text"], dim=-1).t()
        loss = contrastive_ce(logits)
        return loss, {"loss": loss.detach()}

    return fn


def _grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_k_micro_batches_equal_one_big_batch(k):
    x, t = _data()
    model, head = _Towers(), nn.Linear(5, 5)
    model.img[1].p = 0.0  # dropout replay is tested below; here the big batch must be comparable
    loss, _ = _loss(head)(model(x, t))
    loss.backward()
    ref = _grads(model, head)
    model.zero_grad()
    head.zero_grad()
    n = len(x) // k
    got, _, full = cached_backward(
        lambda i: model(x[i * n : (i + 1) * n], t[i * n : (i + 1) * n]), k, _loss(head)
    )
    assert full["image"].shape == (12, 5) and got.item() == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(_grads(model, head), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plain_accumulation_would_differ():
    """The test above can fail: summing per-micro-batch contrastive losses gives other gradients."""
    x, t = _data()
    model, head = _Towers(), nn.Linear(5, 5)
    model.img[1].p = 0.0
    _loss(head)(model(x, t))[0].backward()
    ref = _grads(model)
    model.zero_grad()
    for i in range(3):
        (_loss(head)(model(x[i * 4 : (i + 1) * 4], t[i * 4 : (i + 1) * 4]))[0] / 3).backward()
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(_grads(model), ref))


def test_rng_is_replayed_for_the_second_forward():
    x, t = _data()
    model, head = _Towers().train(), nn.Linear(5, 5)
    seen = []

    def forward(i):
        out = model(x[i * 6 : (i + 1) * 6], t[i * 6 : (i + 1) * 6])
        seen.append(out["image"].detach().clone())
        return out

    cached_backward(forward, 2, _loss(head))
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])  # same dropout masks


def test_batch_grad_scale_and_check():
    x, t = _data()
    model, head = _Towers(), nn.Linear(5, 5)
    model.img[1].p = 0.0
    cached_backward(lambda i: model(x, t), 1, _loss(head))
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cached_backward(lambda i: model(x, t), 1, _loss(head), batch_grad_scale=2.0)
    for n, p in model.named_parameters():
        factor = 1.0 if n == "logit_scale" else 2.0  # the shared 0-dim output is not scaled
        torch.testing.assert_close(p.grad, factor * g1[n])

    def refuse(loss, logs):
        raise RuntimeError("stop")

    model.zero_grad()
    with pytest.raises(RuntimeError, match="stop"):
        cached_backward(lambda i: model(x, t), 1, _loss(head), check=refuse)
    assert all(p.grad is None for p in model.parameters())  # nothing was backpropagated
