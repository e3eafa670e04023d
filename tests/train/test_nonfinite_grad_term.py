"""Issue 23, defect 9: the gradient-norm stop names the loss term that made the gradient non-finite,
also when that term has no parameters of its own (found by re-running the step term by term on the
same batch), and never claims a checkpoint that does not exist."""

from __future__ import annotations

import pytest
import torch
from tiny_models import base_config

from clipdistill.cli.main import main
from clipdistill.train.config import config_from_dict
from clipdistill.train.engine import NonFiniteLoss, train


class _InfGrad(torch.autograd.Function):
    """Identity forward, an infinite gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


@pytest.fixture
def poisoned_crd(monkeypatch):
    """`crd` (a term without parameters) keeps its value but gives the student an infinite gradient."""
    from clipdistill.losses.clip_kd import ContrastiveRelationalDistill

    original = ContrastiveRelationalDistill.forward

    def forward(self, s, t):
        out = original(self, s, t)
        out["crd"] = out["crd"] + 0.0 * _InfGrad.apply(s.image).sum()
        return out

    monkeypatch.setattr(ContrastiveRelationalDistill, "forward", forward)


def test_inf_gradient_of_a_term_without_parameters_names_the_term(tiny, caption_root, tmp_path, poisoned_crd):
    cfg = config_from_dict(base_config(caption_root, tmp_path / "run"))  # clip, crd, fd; grad_clip 1.0
    with pytest.raises(NonFiniteLoss) as err:
        train(cfg)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith("gradient norm is ") and " at step 1, non-finite from term 'crd'" in msg, msg
    assert "'clip'" not in msg.split("(loss terms")[0] and "'fd'" not in msg.split("(loss terms")[0], msg
    assert "no checkpoint was written yet" in msg and "step 0" not in msg, msg


def test_inf_gradient_after_a_checkpoint_names_the_term_and_that_checkpoint(
    tiny, caption_root, tmp_path, monkeypatch
):
    from clipdistill.losses.clip_kd import ContrastiveRelationalDistill

    original = ContrastiveRelationalDistill.forward
    calls = {"n": 0}

    def forward(self, s, t):
        out = original(self, s, t)
        calls["n"] += 1
        if calls["n"] > 3 and torch.is_grad_enabled():  # steps 1-3 are fine; checkpoint_every 2
            out["crd"] = out["crd"] + 0.0 * _InfGrad.apply(s.image).sum()
        return out

    monkeypatch.setattr(ContrastiveRelationalDistill, "forward", forward)
    with pytest.raises(NonFiniteLoss) as err:
        train(config_from_dict(base_config(caption_root, tmp_path / "run")))
    msg = str(err.value)
    assert " at step 4, non-finite from term 'crd'" in msg, msg
    assert "the last good checkpoint (step 2) is kept in" in msg, msg


def test_cli_prints_the_term_in_one_line(tiny, caption_root, tmp_path, poisoned_crd, capsys):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(caption_root, tmp_path / "run", steps=2)))
    rc = main(["distill", "--config", str(cfg)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0
    lines = [line for line in err if "gradient norm is" in line]
    assert len(lines) == 1 and "non-finite from term 'crd'" in lines[0], err
    assert not any("Traceback" in line for line in err), err
