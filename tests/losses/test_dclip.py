"""DCLIP (spec 6): the student term and the meta-teacher head against float64 loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from refs_clip import log_softmax, unit
from term_context import make_ctx

from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.losses.dclip import DclipDistill, DclipMetaHead, attention_pool

pytestmark = pytest.mark.usefixtures("float64")


def make_outputs(n: int, d: int, seed: int, enriched: bool = False) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    out = Outputs(
        image=torch.randn(n, d, generator=g), text=torch.randn(n, d, generator=g), scale=torch.tensor(1.0)
    )
    if enriched:
        out.extra = {
            "image_enriched": torch.randn(n, d, generator=g),
            "text_enriched": torch.randn(n, d, generator=g),
        }
    return out


# ---- references (loops, numpy float64) ----------------------------------------------------------


def _info_nce(a, b, tau):
    n = len(a)
    z = [[float(unit(a[i]) @ unit(b[j])) / tau for j in range(n)] for i in range(n)]
    i2t = -sum(log_softmax(z[i])[i] for i in range(n)) / n
    t2i = -sum(log_softmax([z[j][i] for j in range(n)])[i] for i in range(n)) / n
    return (i2t + t2i) / 2


def ref_dclip(term, student, teacher, weights=(1.0, 1.0, 1.0), tau=0.05):
    parts = []
    for modality in ("image", "text"):
        proj = term._proj[modality]
        target = teacher.extra[f"{modality}_enriched"].numpy()
        rows = student.image if modality == "image" else student.text
        rows = rows.detach().numpy()
        cos = []
        for v, t in zip(rows, target):
            p = v if proj is None else proj.weight.detach().numpy() @ v + proj.bias.detach().numpy()
            cos.append(float(unit(p) @ unit(t)))
        parts.append(sum(1 - c for c in cos) / len(cos))
    parts.append(_info_nce(student.image.detach().numpy(), student.text.detach().numpy(), tau))
    return sum(w * p for w, p in zip(weights, parts)), parts


def ref_pool(tokens, mask, temperature):
    out = []
    for toks, m in zip(tokens, mask):
        real = [t for t, keep in zip(toks, m) if keep]
        mean = sum(real) / len(real)
        sims = [float(unit(t) @ unit(mean)) / temperature for t in real]
        w = [math.exp(x) for x in log_softmax(sims)]
        out.append(sum(wi * t for wi, t in zip(w, real)))
    return np.stack(out)


# ---- the student term --------------------------------------------------------------------------------


@pytest.mark.parametrize("d_s", [3, 5])
def test_dclip_matches_reference(d_s):
    term = DclipDistill(make_ctx(d_s, 5), w_image=0.5, w_text=2.0, w_contrastive=1.5, tau=0.1)
    student, teacher = make_outputs(6, d_s, 1), make_outputs(6, 5, 2, enriched=True)
    out = term(student, teacher)
    total, parts = ref_dclip(term, student, teacher, (0.5, 2.0, 1.5), 0.1)
    assert out["dclip"].item() == pytest.approx(total, rel=1e-10)
    for key, value in zip(("dclip/image", "dclip/text", "dclip/contrastive"), parts):
        assert out[key].item() == pytest.approx(value, rel=1e-10)


def test_dclip_gradcheck_and_freeze_text():
    term = DclipDistill(make_ctx(3, 4))
    teacher = make_outputs(4, 4, 3, enriched=True)
    s = make_outputs(4, 3, 4)
    img, txt = s.image.requires_grad_(), s.text.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: term(s.replace(image=a, text=b), teacher)["dclip"], (img, txt)
    )
    frozen = DclipDistill(make_ctx(3, 4), freeze_text=True)
    frozen(s, teacher)["dclip"].backward()
    assert txt.grad is None and img.grad is not None


def test_dclip_distillation_parts_vanish_when_student_reproduces_teacher():
    term = DclipDistill(make_ctx(4, 4))
    teacher = make_outputs(5, 4, 5, enriched=True)
    student = teacher.replace(
        image=teacher.extra["image_enriched"] * 3.0, text=teacher.extra["text_enriched"].clone()
    )
    out = term(student, teacher)
    assert out["dclip/image"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["dclip/text"].item() == pytest.approx(0.0, abs=1e-12)
    noisy = student.replace(image=student.image + 0.3 * torch.randn(5, 4))
    assert term(noisy, teacher)["dclip/image"].item() > 1e-4


def test_dclip_missing_or_misshapen_enriched_embeddings():
    term = DclipDistill(make_ctx(3, 4))
    with pytest.raises(UserError, match="losses.dclip.head"):
        term(make_outputs(4, 3, 6), make_outputs(4, 4, 7))
    teacher = make_outputs(4, 4, 7, enriched=True)
    teacher.extra["text_enriched"] = teacher.extra["text_enriched"][:3]
    with pytest.raises(UserError, match="3 rows for a batch of 4"):
        term(make_outputs(4, 3, 6), teacher)


# ---- the meta-teacher head ---------------------------------------------------------------------------


def test_attention_pool_matches_reference_with_padding():
    tokens = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = attention_pool(tokens, mask, temperature=2.0)
    assert np.allclose(got.numpy(), ref_pool(tokens.numpy(), mask.numpy(), 2.0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(attention_pool(tokens), attention_pool(tokens, torch.ones(3, 5, dtype=torch.bool)))


def test_head_ignores_padding_text_tokens():
    head = DclipMetaHead(8, image_token_dim=6, text_token_dim=5, num_heads=2)
    image_tokens, text_tokens = torch.randn(2, 4, 6), torch.randn(2, 3, 5)
    padded = torch.cat([text_tokens, 100 * torch.randn(2, 2, 5)], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    img_a, txt_a = head(image_tokens, text_tokens)
    img_b, txt_b = head(image_tokens, padded, mask)
    assert img_a.shape == txt_a.shape == (2, 8)
    assert torch.allclose(img_a, img_b, atol=1e-10) and torch.allclose(txt_a, txt_b, atol=1e-10)


def test_head_faithful_mixes_both_sides_into_the_image_target():
    clean = DclipMetaHead(4, num_heads=2)
    faithful = DclipMetaHead(4, num_heads=2, faithful=True)
    faithful.load_state_dict(clean.state_dict())
    image_tokens, text_tokens = torch.randn(3, 4, 4), torch.randn(3, 2, 4)
    img, txt = clean(image_tokens, text_tokens)
    img_f, txt_f = faithful(image_tokens, text_tokens)
    assert torch.allclose(img_f, 0.5 * (img + txt)) and torch.allclose(txt_f, txt)


def test_head_loss_matches_reference_and_gradcheck():
    head = DclipMetaHead(4, image_token_dim=3, num_heads=2)
    image_tokens, text_tokens = torch.randn(3, 2, 3).requires_grad_(), torch.randn(3, 2, 4)
    img, txt = head(image_tokens, text_tokens)
    value = DclipMetaHead.contrastive_loss(img, txt).item()
    assert value == pytest.approx(_info_nce(img.detach().numpy(), txt.detach().numpy(), 0.05), rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda x: DclipMetaHead.contrastive_loss(*head(x, text_tokens), tau=0.5), (image_tokens,)
    )


def test_term_with_head_file_computes_enriched_online(tmp_path):
    head = DclipMetaHead(4, image_token_dim=6, text_token_dim=5, num_heads=2, faithful=True)
    head.save(tmp_path / "head.pt")
    assert DclipMetaHead.load(tmp_path / "head.pt").config == head.config
    term = DclipDistill(make_ctx(3, 4), head=str(tmp_path / "head.pt"))
    assert {"teacher_image_tokens", "text_tokens"} <= term.needs and DclipDistill.needs == frozenset(
        {"teacher"}
    )
    assert all(not p.requires_grad for p in term.head.parameters())
    teacher = make_outputs(3, 4, 8)
    teacher = teacher.replace(
        image_tokens=torch.randn(3, 2, 6),
        text_tokens=torch.randn(3, 4, 5),
        text_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool),
    )
    with torch.no_grad():
        img, txt = head(teacher.image_tokens, teacher.text_tokens, teacher.text_mask)
    student = make_outputs(3, 3, 9)
    online = term(student, teacher)["dclip"].item()
    cached = term(student, teacher.replace(extra={"image_enriched": img, "text_enriched": txt}))[
        "dclip"
    ].item()
    assert online == pytest.approx(cached, rel=1e-12)
    with pytest.raises(UserError, match="does not exist"):
        DclipDistill(make_ctx(3, 4), head=str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="train the head on this teacher"):
        DclipDistill(make_ctx(3, 7), head=str(tmp_path / "head.pt"))
