"""workflows/training/optim.py: the multi-tensor LAMB against the per-tensor reference, and
the AdamW that build_optimizer picks (pure torch, no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bert_core
from workflows.config import LoopSettings
from workflows.training.optim import Lamb, build_optimizer, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    config = bert_core.BertConfig.preset("tiny", vocab_size=64, max_position_embeddings=16)
    return bert_core.BertForPreTraining(config)


def _set_grads(model: nn.Module, step: int, skip: set[str] = frozenset()) -> None:
    for name, p in model.named_parameters():
        if name in skip:
            p.grad = None
            continue
        g = torch.Generator().manual_seed(step * 7919 + len(name))
        p.grad = torch.randn(p.shape, generator=g) * (10.0 if "norm" in name else 0.01)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("scratch", [True, False], ids=["cpu-buffers", "allocating"])
def test_foreach_lamb_equals_per_tensor_lamb_over_20_steps(weight_decay, scratch, monkeypatch):
    """Same parameters (1e-6) after 20 steps, with weight decay or without, a zero-initialised
    weight (trust ratio 1), and a weight and a bias without gradients on some steps (so the groups'
    tensors have different step counts and bias corrections). Both ways of the multi-tensor
    step: with buffers kept between steps (CPU) and allocating (CUDA's caching allocator)."""
    if not scratch:
        monkeypatch.setattr(Lamb, "scratch_devices", ())
    reference = _model()
    with torch.no_grad():
        reference.nsp.weight.zero_()
    multi = copy.deepcopy(reference)
    ref_opt = Lamb(param_groups(reference, weight_decay), lr=2e-2, foreach=False)
    opt = Lamb(param_groups(multi, weight_decay), lr=2e-2)
    assert opt.foreach
    sometimes = {"mlm.dense.weight", "mlm.dense.bias"}  # an adapted and a plain tensor
    for step in range(20):
        for model in (reference, multi):
            _set_grads(model, step, sometimes if step % 3 == 1 else set())
        ref_opt.step()
        opt.step()
    moved = 0
    for (name, a), b in zip(reference.named_parameters(), multi.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
        moved += int(not torch.equal(a, _model().state_dict()[name]))
    assert moved > 0.9 * len(list(reference.parameters()))
    ref_state = ref_opt.state_dict()["state"]
    for key, state in opt.state_dict()["state"].items():  # checkpoints move between them
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}  # no buffers in checkpoints
        assert state["step"].item() == ref_state[key]["step"].item()
        torch.testing.assert_close(state["exp_avg_sq"], ref_state[key]["exp_avg_sq"])


def test_foreach_lamb_steps_low_precision_parameters_through_fp32():
    w32 = nn.Parameter(torch.linspace(-1, 1, 64).reshape(8, 8))
    w16 = nn.Parameter(w32.detach().to(torch.bfloat16))
    opts = [Lamb([w32], lr=1e-2, foreach=False), Lamb([w16], lr=1e-2)]
    for step in range(5):
        g = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
        w32.grad, w16.grad = g.clone(), g.to(torch.bfloat16)
        for opt in opts:
            opt.step()
    assert w16.dtype == torch.bfloat16
    assert opts[1].state[w16]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(w16.float(), w32.detach(), atol=2e-2, rtol=0)


def test_build_optimizer_takes_torchs_fused_adamw_on_cpu():
    model = _model()
    loop = LoopSettings(optimizer="adamw", lr=1e-3)
    opt = build_optimizer(model, loop)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    lamb = build_optimizer(model, LoopSettings(optimizer="lamb", lr=1e-3))
    assert isinstance(lamb, Lamb) and lamb.foreach
    # fused AdamW trains like the per-tensor one
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(param_groups(reference, loop.weight_decay), lr=loop.lr,
                                betas=(loop.adam_beta1, loop.adam_beta2), eps=loop.adam_eps,
                                foreach=False)
    for step in range(5):
        _set_grads(model, step)
        _set_grads(reference, step)
        opt.step()
        ref_opt.step()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
