"""CLIP-CID cluster and instance terms (spec 4.2-4.3): float64 loop references, gradcheck, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from refs_clip import log_softmax, unit
from term_context import make_ctx
from torch.func import functional_call

from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.losses.clip_cid import ClusterDistill, InstanceDistill

pytestmark = pytest.mark.usefixtures("float64")


def make_outputs(n: int, d: int, seed: int, labels=None) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    return Outputs(image=torch.randn(n, d, generator=g), text=None, scale=torch.tensor(1.0), labels=labels)


def centres_array(k: int, d: int, seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(k, d))


# ---- independent references (loops, numpy float64) -----------------------------------------------


def _student_rows(term, student):
    proj = term._proj["image"]
    rows = []
    for v in student.image.detach().numpy():
        if proj is not None:
            v = proj.weight.detach().numpy() @ v + proj.bias.detach().numpy()
        rows.append(unit(v))
    return rows


def ref_cluster(term, student, teacher, labels, alpha, tau, classes=None, margin=0.0):
    w = [unit(c) for c in term.centres.numpy()]
    ws = [unit(c) for c in term.classifier.detach().numpy()]
    k = len(w)
    classes = list(range(k)) if classes is None else list(classes)
    l_cls = l_kl = 0.0
    s_rows = _student_rows(term, student)
    for i, v_s in enumerate(s_rows):
        v_t = unit(teacher.image.numpy()[i])
        cos = [float(v_s @ ws[c]) for c in classes]
        pos = classes.index(int(labels[i]))
        if margin:
            cos[pos] = math.cos(math.acos(cos[pos]) + margin)
        l_cls -= log_softmax([c / tau for c in cos])[pos]
        lp = log_softmax([float(v_t @ w[c]) / tau for c in range(k)])
        lq = log_softmax([float(v_s @ ws[c]) / tau for c in range(k)])
        l_kl += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    n = len(s_rows)
    return alpha * l_cls / n + (1 - alpha) * l_kl / n


def ref_instance(term, student, teacher, tau):
    s_rows = _student_rows(term, student)
    t_rows = [unit(v) for v in teacher.image.numpy()]
    n = len(s_rows)
    z = [[float(s_rows[i] @ t_rows[j]) / tau for j in range(n)] for i in range(n)]
    a = -sum(log_softmax(z[i])[i] for i in range(n)) / n
    b = -sum(log_softmax([z[j][i] for j in range(n)])[i] for i in range(n)) / n
    return (a + b) / 2


# ---- cluster ---------------------------------------------------------------------------------------


def test_cluster_matches_reference_with_width_mismatch():
    term = ClusterDistill(make_ctx(3, 5), centres_array=centres_array(7, 5), alpha=0.7, tau=0.2)
    labels = torch.tensor([0, 3, 3, 6, 1, 2])
    student, teacher = make_outputs(6, 3, 1), make_outputs(6, 5, 2, labels)
    with torch.no_grad():
        term.classifier.add_(0.1 * torch.randn_like(term.classifier))  # W_s no longer equals W
    out = term(student, teacher)
    assert out["cluster"].item() == pytest.approx(
        ref_cluster(term, student, teacher, labels, 0.7, 0.2), rel=1e-10
    )
    assert out["cluster/cls"].item() == pytest.approx(
        ref_cluster(term, student, teacher, labels, 1.0, 0.2), rel=1e-10
    )
    assert out["cluster/kl"].item() == pytest.approx(
        ref_cluster(term, student, teacher, labels, 0.0, 0.2), rel=1e-10
    )


def test_cluster_margin_matches_arccos_reference():
    term = ClusterDistill(make_ctx(4, 4), centres_array=centres_array(5, 4), margin=0.3, tau=0.1)
    labels = torch.tensor([4, 0, 2, 2])
    student, teacher = make_outputs(4, 4, 3), make_outputs(4, 4, 4, labels)
    value = term(student, teacher)["cluster/cls"].item()
    assert value == pytest.approx(ref_cluster(term, student, teacher, labels, 1.0, 0.1, margin=0.3), rel=1e-9)
    assert value > ref_cluster(term, student, teacher, labels, 1.0, 0.1)  # the margin makes the task harder


def test_cluster_negative_sampling_keeps_positives_and_is_per_step():
    term = ClusterDistill(make_ctx(3, 5), centres_array=centres_array(20, 5), neg_ratio=0.3, alpha=1.0)
    labels = torch.tensor([19, 0, 7, 7])
    student, teacher = make_outputs(4, 3, 5), make_outputs(4, 5, 6, labels)
    classes = term.sampled_classes(labels)
    assert classes.numel() == 6 and set(labels.tolist()) <= set(classes.tolist())
    assert torch.equal(classes, term.sampled_classes(labels))  # same step: same sample (and on every rank)
    value = term(student, teacher)["cluster"].item()
    assert value == pytest.approx(
        ref_cluster(term, student, teacher, labels, 1.0, 0.07, classes.tolist()), rel=1e-10
    )
    assert value < ref_cluster(term, student, teacher, labels, 1.0, 0.07)  # fewer negatives, smaller CE
    samples = {tuple(classes.tolist())}
    for _ in range(3):
        term.update(student, teacher)
        samples.add(tuple(term.sampled_classes(labels).tolist()))
    assert len(samples) > 1


def test_cluster_labels_default_to_nearest_centre():
    term = ClusterDistill(make_ctx(3, 5), centres_array=centres_array(6, 5), alpha=0.5)
    student, teacher = make_outputs(5, 3, 7), make_outputs(5, 5, 8)
    nearest = torch.tensor([int(np.argmax(term.centres.numpy() @ v)) for v in teacher.image.numpy()])
    with_labels = term(student, teacher.replace(labels=nearest))["cluster"]
    assert term(student, teacher)["cluster"].item() == pytest.approx(with_labels.item(), rel=1e-12)


def test_cluster_gradcheck_inputs_and_classifier():
    term = ClusterDistill(
        make_ctx(3, 4), centres_array=centres_array(6, 4), alpha=0.6, neg_ratio=0.5, margin=0.2, tau=0.5
    )
    labels = torch.tensor([1, 5, 5])
    teacher = make_outputs(3, 4, 9, labels)
    img = make_outputs(3, 3, 10).image.requires_grad_()
    w = (term.classifier.detach() + 0.1 * torch.randn(6, 4)).requires_grad_()

    def fn(img, w):
        student = Outputs(image=img, text=None, scale=torch.tensor(1.0))
        return functional_call(term, {"classifier": w}, (student, teacher))["cluster"]

    assert torch.autograd.gradcheck(fn, (img, w))


def test_cluster_minimum_at_teacher_for_the_distribution_part():
    term = ClusterDistill(make_ctx(4, 4), centres_array=centres_array(5, 4), alpha=0.0)
    teacher = make_outputs(6, 4, 11)
    student = teacher.replace(image=teacher.image.clone().requires_grad_())
    loss = term(student, teacher)["cluster"]
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, student.image)
    assert grad.abs().max().item() < 1e-10
    noisy = teacher.replace(image=teacher.image + 0.1 * torch.randn(6, 4))
    assert term(noisy, teacher)["cluster"].item() > 1e-4


def test_cluster_centres_file_param_group_and_ownership(tmp_path):
    arr = centres_array(4, 5)
    np.save(tmp_path / "centres.npy", arr)
    term = ClusterDistill(make_ctx(3, 5), centres=str(tmp_path / "centres.npy"))
    expected = torch.nn.functional.normalize(torch.as_tensor(arr), dim=-1)
    assert torch.allclose(term.centres, expected.to(term.centres.dtype))
    assert torch.equal(term.classifier.detach(), term.centres)
    assert term.param_group() == "cluster_classifier"
    # Only W_s is the term's own parameter: the shared projector stays in the Distiller's group.
    assert [name for name, _ in term.named_parameters()] == ["classifier"]
    assert {"centres", "classifier", "step"} <= set(term.state_dict())


def test_cluster_bad_centres_and_options(tmp_path):
    with pytest.raises(UserError, match="losses.cluster.centres"):
        ClusterDistill(make_ctx(3, 5))
    with pytest.raises(UserError, match="does not exist"):
        ClusterDistill(make_ctx(3, 5), centres=str(tmp_path / "missing.npy"))
    with pytest.raises(UserError, match="width 4 but the teacher embeddings have 5"):
        ClusterDistill(make_ctx(3, 5), centres_array=centres_array(3, 4))
    with pytest.raises(UserError, match="neg_ratio"):
        ClusterDistill(make_ctx(3, 5), centres_array=centres_array(3, 5), neg_ratio=0)
    with pytest.raises(UserError, match="has no option 'beta'"):
        ClusterDistill(make_ctx(3, 5), centres_array=centres_array(3, 5), beta=1)


# ---- instance ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_s", [3, 5])
def test_instance_matches_reference(d_s):
    term = InstanceDistill(make_ctx(d_s, 5), tau=0.3)
    student, teacher = make_outputs(5, d_s, 12), make_outputs(5, 5, 13)
    expected = ref_instance(term, student, teacher, 0.3)
    assert term(student, teacher)["instance"].item() == pytest.approx(expected, rel=1e-10)
    assert InstanceDistill.default_weight == 0.5


def test_instance_gradcheck_and_no_teacher_gradient():
    term = InstanceDistill(make_ctx(3, 4))
    teacher_img = make_outputs(4, 4, 14).image.requires_grad_()
    img = make_outputs(4, 3, 15).image.requires_grad_()

    def fn(img):
        student = Outputs(image=img, text=None, scale=torch.tensor(1.0))
        teacher = Outputs(image=teacher_img, text=None, scale=torch.tensor(1.0))
        return term(student, teacher)["instance"]

    assert torch.autograd.gradcheck(fn, (img,))
    fn(img).backward()
    assert teacher_img.grad is None
