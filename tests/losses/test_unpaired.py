"""Mixed batches (issue 6 track B): caption-less images reach exactly the terms defined on them, with
the values of independent float64 references, gradients only where those terms put them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refs_clip import unit
from test_relational import make_outputs, ref_relation

from clipdistill.losses.base import Outputs
from clipdistill.losses.config import parse_loss_config
from clipdistill.losses.distiller import Distiller


def _image_only(n: int, d: int, scale: float, seed: int) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    return Outputs(image=torch.randn(n, d, generator=g), text=None, scale=torch.tensor(scale))


def _mse_ref(s: np.ndarray, t: np.ndarray) -> float:
    """Mean over elements of (unit(s_i) - unit(t_i))^2, by loops."""
    total, count = 0.0, 0
    for a, b in zip(s, t):
        ua, ub = unit(a), unit(b)
        for x, y in zip(ua, ub):
            total += (x - y) ** 2
            count += 1
    return total / count


def test_fd_on_unpaired_images_matches_reference_and_clip_ignores_them(float64):
    dist = Distiller(parse_loss_config({"clip": 1.0, "fd": 3.0}), 5, 5, unpaired_weight=0.5)
    s, t = make_outputs(4, 5, 20.0, 1), make_outputs(4, 5, 50.0, 2)
    su, tu = _image_only(6, 5, 20.0, 3), _image_only(6, 5, 50.0, 4)
    su.image.requires_grad_(True)
    total, logs = dist(s, t, (su, tu))
    paired_total, paired_logs = dist(s, t)
    fd_u = _mse_ref(su.image.detach().numpy(), tu.image.numpy())
    assert logs["fd/unpaired"].item() == pytest.approx(fd_u, rel=1e-10)
    assert logs["fd"].item() == pytest.approx(paired_logs["fd"].item() + 0.5 * fd_u, rel=1e-10)
    assert logs["clip"].item() == pytest.approx(paired_logs["clip"].item(), rel=1e-12)
    assert "clip/unpaired" not in logs
    assert total.item() == pytest.approx(paired_total.item() + 3.0 * 0.5 * fd_u, rel=1e-10)
    total.backward()
    assert su.image.grad is not None and su.image.grad.abs().sum() > 0


def test_terms_without_an_unpaired_form_give_unpaired_rows_no_gradient(float64):
    dist = Distiller(parse_loss_config({"clip": 1.0, "crd": 1.0, "kd": 1.0}), 5, 5)
    s, t = make_outputs(4, 5, 20.0, 1), make_outputs(4, 5, 50.0, 2)
    su, tu = _image_only(3, 5, 20.0, 3), _image_only(3, 5, 50.0, 4)
    su.image.requires_grad_(True)
    total, logs = dist(s, t, (su, tu))
    assert total.item() == pytest.approx(dist(s, t)[0].item(), rel=1e-12)
    assert not any(k.endswith("/unpaired") for k in logs)
    assert su.image.grad is None or su.image.grad.abs().sum() == 0


def test_relational_unpaired_queries_match_loop_reference_with_bank(float64):
    opts = {"bank_size": 8, "w_i2t": 1.0, "w_i2i": 0.5}
    dist = Distiller(parse_loss_config({"relational": opts}), 3, 5)
    term = dist.terms["relational"]
    history = make_outputs(5, 5, 50.0, 7)
    dist.update(make_outputs(5, 3, 20.0, 6), history)
    s, t = make_outputs(4, 3, 20.0, 8), make_outputs(4, 5, 50.0, 9)
    su, tu = _image_only(3, 3, 20.0, 10), _image_only(3, 5, 50.0, 11)
    _, logs = dist(s, t, (su, tu))
    proj = term._proj["image"]
    w, b = proj.weight.detach().numpy(), proj.bias.detach().numpy()
    sq_proj = np.stack([w @ row + b for row in su.image.numpy()])
    banks = {m: np.stack([unit(r) for r in getattr(history, m).numpy()]) for m in ("image", "text")}
    i2t = ref_relation(
        su.image.numpy(),
        s.text.numpy(),
        tu.image.numpy(),
        t.text.numpy(),
        50.0,
        20.0,
        False,
        banks["text"],
        sq_proj,
    )
    i2i = ref_relation(
        su.image.numpy(),
        su.image.numpy(),
        tu.image.numpy(),
        tu.image.numpy(),
        25.0,
        25.0,
        True,
        banks["image"],
        sq_proj,
    )
    assert logs["relational/i2t_unpaired"].item() == pytest.approx(i2t, rel=1e-10)
    assert logs["relational/i2i_unpaired"].item() == pytest.approx(i2i, rel=1e-10)
    assert logs["relational/unpaired"].item() == pytest.approx(i2t + 0.5 * i2i, rel=1e-10)
    # after the step the unpaired teacher images join the image bank (oldest first: history, batch, unpaired)
    dist.update(s, t, (su, tu))
    bank = term.banks["image"].ordered().numpy()
    expected = np.concatenate([history.image.numpy(), t.image.numpy(), tu.image.numpy()])[-8:]
    np.testing.assert_allclose(bank, np.stack([unit(r) for r in expected]), rtol=1e-12)


def test_gradcheck_relational_unpaired(float64):
    dist = Distiller(parse_loss_config({"relational": {"bank_size": 0}}), 3, 4)
    s, t = make_outputs(3, 3, 20.0, 1), make_outputs(3, 4, 50.0, 2)
    tu = _image_only(3, 4, 50.0, 4)
    img = torch.randn(3, 3).requires_grad_(True)

    def fn(x):
        return dist(s, t, (Outputs(image=x, text=None, scale=s.scale), tu))[1]["relational/unpaired"]

    def fn_grad(x):
        total, _ = dist(s, t, (Outputs(image=x, text=None, scale=s.scale), tu))
        return total

    assert torch.autograd.gradcheck(fn_grad, (img,))
    assert fn(img).item() > 0


def test_negative_unpaired_weight_is_refused():
    from clipdistill.errors import UserError

    with pytest.raises(UserError, match="unpaired_weight"):
        Distiller(parse_loss_config({"clip": 1.0}), 4, 4, unpaired_weight=-1.0)


def _text_only(n: int, d: int, scale: float, seed: int) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    return Outputs(image=None, text=torch.randn(n, d, generator=g), scale=torch.tensor(scale))


def test_corpus_texts_reach_fd_text_side_and_relational_text_queries(float64):
    dist = Distiller(
        parse_loss_config({"clip": 1.0, "fd": 2.0, "relational": {"bank_size": 0}}), 5, 5, text_weight=0.25
    )
    s, t = make_outputs(4, 5, 20.0, 1), make_outputs(4, 5, 50.0, 2)
    st, tt = _text_only(3, 5, 20.0, 3), _text_only(3, 5, 50.0, 4)
    st.text.requires_grad_(True)
    total, logs = dist(s, t, texts=(st, tt))
    base_total, base = dist(s, t)
    fd_t = _mse_ref(st.text.detach().numpy(), tt.text.numpy())
    assert logs["fd/texts"].item() == pytest.approx(fd_t, rel=1e-10)
    npst, nptt = st.text.detach().numpy(), tt.text.numpy()
    t2i = ref_relation(npst, s.image.numpy(), nptt, t.image.numpy(), 50.0, 20.0, False)
    t2t = ref_relation(npst, npst, nptt, nptt, 25.0, 25.0, True)
    assert logs["relational/t2i_texts"].item() == pytest.approx(t2i, rel=1e-10)
    assert logs["relational/t2t_texts"].item() == pytest.approx(t2t, rel=1e-10)
    expected = base_total.item() + 0.25 * (2.0 * fd_t + t2i + 0.5 * t2t)
    assert total.item() == pytest.approx(expected, rel=1e-10)
    assert "clip/texts" not in logs
    total.backward()
    assert st.text.grad.abs().sum() > 0
