"""Independent float64 references (explicit Python loops over numpy rows) and builders for the tests
of clip, kd, affinity and the CLIP-KD terms; `unit` and `log_softmax` serve every loss test's reference.
Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clipdistill.losses import Distiller, Outputs, parse_loss_config


def make_pair(
    n: int, d_s: int, d_t: int, seed: int, s: float = 5.0, s_t: float = 7.0
) -> tuple[Outputs, Outputs]:
    """Random float64 student and teacher outputs (student with a masked view), leaves with grad."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    student = Outputs(
        image=leaf(n, d_s),
        text=leaf(n, d_s),
        scale=torch.tensor(s, dtype=torch.float64).requires_grad_(),
        image_masked=leaf(n, d_s),
    )
    teacher = Outputs(
        image=torch.randn(n, d_t, generator=g, dtype=torch.float64),
        text=torch.randn(n, d_t, generator=g, dtype=torch.float64),
        scale=torch.tensor(s_t, dtype=torch.float64),
    )
    return student, teacher


def build(name: str, d_s: int, d_t: int, **opts) -> Distiller:
    torch.manual_seed(0)
    return Distiller(parse_loss_config({name: {"weight": 1.0, **opts}}), d_s, d_t).double()


def np_(x) -> np.ndarray:
    return x.detach().numpy().astype(np.float64)


# ---- numpy loop references ------------------------------------------------------------------


def unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(float(a) * float(a) for a in v))


def linear(weight: np.ndarray, bias: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.array(
        [sum(weight[o, i] * v[i] for i in range(v.shape[0])) + bias[o] for o in range(weight.shape[0])]
    )


def log_softmax(row) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def logits(a: np.ndarray, b: np.ndarray, scale: float, normalize: bool = True) -> np.ndarray:
    n, m = a.shape[0], b.shape[0]
    out = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            ai, bj = (unit(a[i]), unit(b[j])) if normalize else (a[i], b[j])
            out[i, j] = scale * sum(float(x) * float(y) for x, y in zip(ai, bj))
    return out


def ce_identity(z: np.ndarray) -> float:
    return sum(-log_softmax(list(z[i]))[i] for i in range(z.shape[0])) / z.shape[0]


def clip_loss(z: np.ndarray) -> float:
    return (ce_identity(z) + ce_identity(z.T)) / 2


def kl_mean(t: np.ndarray, s: np.ndarray, temp: float = 1.0) -> float:
    total = 0.0
    for i in range(t.shape[0]):
        lp, lq = log_softmax(list(t[i] / temp)), log_softmax(list(s[i] / temp))
        total += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
    return total / t.shape[0]


def soft_ce_mean(t: np.ndarray, s: np.ndarray, temp: float = 1.0) -> float:
    total = 0.0
    for i in range(t.shape[0]):
        lp, lq = log_softmax(list(t[i] / temp)), log_softmax(list(s[i] / temp))
        total -= sum(math.exp(a) * b for a, b in zip(lp, lq))
    return total / t.shape[0]


def project_rows(x: np.ndarray, proj) -> np.ndarray:
    """normalize(P(x)) row by row; proj is None or (weight, bias) arrays."""
    rows = [linear(proj[0], proj[1], r) if proj is not None else r for r in x]
    return np.array([unit(r) for r in rows])


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return sum(float(x - y) ** 2 for x, y in zip(a.ravel(), b.ravel())) / a.size


def contrastive_grads(p: np.ndarray, k: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """g_p[i] = sum_j (P_ij - [i=j]) k_j / (tau N), g_k[j] = sum_i (P_ij - [i=j]) p_i / (tau N)."""
    n = p.shape[0]
    prob = np.array(
        [[math.exp(v) for v in log_softmax([float(p[i] @ k[j]) / tau for j in range(n)])] for i in range(n)]
    )
    g_p, g_k = np.zeros_like(p), np.zeros_like(k)
    for i in range(n):
        for j in range(n):
            c = (prob[i, j] - (1.0 if i == j else 0.0)) / (tau * n)
            g_p[i] += c * k[j]
            g_k[j] += c * p[i]
    return g_p, g_k
