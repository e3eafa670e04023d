"""The Distiller: projectors, weighted sum and logs, needs checks, parameter groups, state, update."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from refs_clip import make_pair

from clipdistill.errors import UserError
from clipdistill.losses import Distiller, Outputs, parse_loss_config
from clipdistill.losses.base import NEEDS


def distiller(spec: dict, d_s: int = 3, d_t: int = 5) -> Distiller:
    torch.manual_seed(0)
    return Distiller(parse_loss_config(spec), d_s, d_t).double()


def test_total_is_the_weighted_sum_and_logs_are_detached():
    s, t = make_pair(6, 3, 5, seed=1)
    dist = distiller({"clip": 1.0, "crd": 0.5, "icl": 1.0, "fd": 2000})
    total, logs = dist(s, t)
    expect = logs["clip"] + 0.5 * logs["crd"] + logs["icl"] + 2000 * logs["fd"]
    assert total.item() == pytest.approx(expect.item(), rel=1e-12)
    assert logs["loss"].item() == pytest.approx(total.item())
    assert {"crd/i2t", "crd/t2i", "fd/image", "fd/text", "icl/scale"} <= set(logs)
    assert all(not v.requires_grad for v in logs.values())
    assert total.requires_grad


def test_projectors_are_shared_and_created_only_when_needed():
    dist = distiller({"fd": 1.0, "icl": 1.0, "gd": 1.0, "afd": 1.0, "crd": 1.0})
    assert sorted(dist.projectors) == ["image", "text"]
    assert dist.terms["fd"]._proj["image"] is dist.terms["icl"]._proj["image"] is dist.projectors["image"]
    p = dist.projectors["image"]
    assert (p.in_features, p.out_features) == (3, 5) and p.bias is not None
    assert len(distiller({"clip": 1.0, "crd": 1.0}).projectors) == 0  # relation-only terms
    assert len(distiller({"fd": 1.0}, 5, 5).projectors) == 0  # equal widths


def test_private_projector_is_owned_by_the_distiller():
    dist = distiller({"clip": 1.0})
    own = dist._projector("image", own=True)
    assert own is not dist._projector("image") and own in list(dist.projectors.values())
    with pytest.raises(ValueError):
        dist._projector("audio")


def test_zero_weight_term_is_logged_but_adds_no_gradient():
    s, t = make_pair(5, 3, 5, seed=2)
    dist = distiller({"clip": 1.0, "fd": 0.0})
    total, logs = dist(s, t)
    assert logs["fd"].item() > 0
    total.backward()
    assert dist.projectors["image"].weight.grad is None
    alone = distiller({"clip": 1.0})
    assert total.item() == pytest.approx(alone(s, t)[0].item(), rel=1e-12)


def test_all_zero_weights_give_a_differentiable_zero():
    s, t = make_pair(4, 3, 5, seed=3)
    total, _ = distiller({"crd": 0.0})(s, t)
    total.backward()
    assert total.item() == 0.0 and s.image.grad is not None


def test_no_gradient_reaches_the_teacher():
    s, t = make_pair(5, 3, 5, seed=4)
    t = t.replace(image=t.image.clone().requires_grad_(), scale=t.scale.clone().requires_grad_())
    total, _ = distiller({"kd": 1, "crd": 1, "fd": 1, "gd": 1, "icl": 1, "afd": 1, "affinity": 1})(s, t)
    total.backward()
    assert t.image.grad is None and t.scale.grad is None


def test_check_refuses_unmet_needs_naming_the_term():
    dist = distiller({"clip": 1.0, "mfd": 2000})
    with pytest.raises(UserError, match=r"term 'mfd' needs 'masked_view'.*teacher mode 'cached'"):
        dist.check("cached", {"teacher", "teacher_text"})
    dist.check("cached", {"teacher_text", "masked_view"})
    with pytest.raises(UserError, match="term 'mfd' needs 'teacher'"):
        dist.check("none", set(NEEDS))
    with pytest.raises(UserError, match="unknown teacher mode 'offline'; known: online, cached, none"):
        dist.check("offline", set(NEEDS))
    assert dist.needs == {"teacher", "teacher_text", "masked_view"}
    distiller({"clip": 1.0}).check("none", set())


def test_check_teacher_online_need():
    dist = distiller({"clip": 1.0})
    dist.terms["clip"].needs = frozenset({"teacher_online"})  # instance-level needs are honoured
    dist.check("online", set())
    with pytest.raises(UserError, match="teacher_online"):
        dist.check("cached", {"teacher_online"})


def test_forward_without_teacher_for_a_teacher_term_is_a_user_error():
    s, _ = make_pair(4, 3, 5, seed=5)
    with pytest.raises(UserError, match="term 'crd' needs a teacher"):
        distiller({"clip": 1.0, "crd": 1.0})(s, None)
    total, logs = distiller({"clip": 1.0})(s, None)
    assert set(logs) == {"clip", "loss"}


def test_param_groups_cover_each_parameter_once():
    spec = {
        "clip": 1.0,
        "fd": 1.0,
        "icl": 1.0,
        "cluster": {"centres_array": np.eye(4, 5)},
        "instance": 0.5,
    }
    dist = distiller(spec)
    groups = {g["name"]: g for g in dist.param_groups(1e-3, 0.1)}
    assert set(groups) == {"distiller", "cluster_classifier"} and dist.group_names() == list(groups)
    assert all(
        g["lr"] == 1e-3 and g["weight_decay"] == 0.1 for g in groups.values()
    )  # optim.groups: optim.py
    assert [id(p) for p in groups["cluster_classifier"]["params"]] == [id(dist.terms["cluster"].classifier)]
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in dist.parameters()}
    torch.optim.AdamW(list(groups.values()))  # valid optimiser groups
    # the group names are known from the config alone (a run checks optim.groups against them at load)
    assert parse_loss_config({"clip": 1.0}).group_names() == ["distiller"]
    assert parse_loss_config(spec).group_names() == ["distiller", "cluster_classifier"]


def test_state_dict_round_trip_reproduces_the_loss():
    s, t = make_pair(5, 3, 5, seed=6)
    spec = {"fd": 1.0, "icl": 1.0, "afd": 1.0, "relational": {"bank_size": 8}}
    dist = distiller(spec)
    with torch.no_grad():
        for p in dist.parameters():
            p.add_(0.1)
    dist.update(s, t)
    buf = io.BytesIO()
    torch.save(dist.state_dict(), buf)
    torch.manual_seed(123)
    fresh = Distiller(parse_loss_config(spec), 3, 5).double()
    assert fresh(s, t)[0].item() != pytest.approx(dist(s, t)[0].item())
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert fresh(s, t)[0].item() == pytest.approx(dist(s, t)[0].item(), rel=1e-12)


def test_update_reaches_terms_with_state():
    s, t = make_pair(5, 3, 5, seed=7)
    dist = distiller({"clip": 1.0, "relational": {"bank_size": 8}})
    before, _ = dist(s, t)
    dist.update(s, t)
    assert int(dist.terms["relational"].banks["image"].count) == 5
    after, _ = dist(s, t)
    assert after.item() != pytest.approx(before.item())  # the bank now adds candidates


def test_terms_share_one_context():
    dist = distiller({"eduattention": 1.0, "comkd_kl": 1.0})
    assert dist.terms["eduattention"].edu is dist.terms["comkd_kl"].edu
    n_edu = sum(p.numel() for p in dist.terms["eduattention"].edu.parameters())
    n_proj = sum(p.numel() for p in dist.projectors.parameters())
    assert sum(p.numel() for p in dist.parameters()) == n_edu + n_proj


def test_training_the_student_towards_the_teacher_lowers_the_distillation_loss():
    torch.manual_seed(0)
    _, t = make_pair(8, 4, 6, seed=8)
    student = torch.nn.Linear(6, 4).double()  # a "student" that maps fixed inputs to embeddings
    x_img, x_txt = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    dist = distiller({"crd": 1.0, "fd": 100.0, "icl": 1.0}, 4, 6)
    params = list(student.parameters()) + [p for g in dist.param_groups(0.05, 0.0) for p in g["params"]]
    opt = torch.optim.Adam(params, lr=0.05)
    scale = torch.tensor(7.0, dtype=torch.float64)
    losses = []
    for _ in range(60):
        out = Outputs(image=student(x_img), text=student(x_txt), scale=scale)
        total, _ = dist(out, t)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0]
