"""Optimisers and schedules of the training loop (pure torch; unit-tested without Ray).

- `param_groups`: decay everything except biases and LayerNorm parameters (BERT recipe).
- `Lamb`: layer-wise adaptive moments (You et al., 2019, "Large Batch Optimization for
  Deep Learning"); torch has no LAMB of its own.
- `linear_warmup_decay`: LR factor rising linearly over the warmup, then decaying
  linearly to 0 at `max_steps` (the schedule of BERT).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from workflows.config import LoopSettings


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with `weight_decay`, biases and LayerNorm parameters without."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
            no_decay.add(id(p))
    seen: set[int] = set()
    decay, plain = [], []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (plain if id(p) in no_decay else decay).append(p)
    # "adapt": LAMB's trust ratio applies to weights only; near-zero biases and LayerNorm
    # parameters would otherwise get vanishing steps (as in Google's BERT LAMB).
    return [{"params": decay, "weight_decay": weight_decay, "adapt": True},
            {"params": plain, "weight_decay": 0.0, "adapt": False}]


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments (bias-corrected), decoupled weight decay added to the update,
    and each tensor's step scaled by the trust ratio ||w|| / ||update||. A param group
    with "adapt": False (biases, LayerNorm in `param_groups`) takes plain Adam steps."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay, "adapt": True})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (torch API)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** t)
                v_hat = v / (1 - beta2 ** t)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, u_norm = p.float().norm(), update.norm()
                    # Trust ratio 1 where either norm is 0 (e.g. a zero-initialised weight).
                    update.mul_(torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                            torch.ones_like(w_norm)))
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, loop: LoopSettings) -> torch.optim.Optimizer:
    """AdamW or LAMB over `param_groups(model)` with the loop's hyper-parameters."""
    groups = param_groups(model, loop.weight_decay)
    betas = (loop.adam_beta1, loop.adam_beta2)
    if loop.optimizer == "lamb":
        return Lamb(groups, lr=loop.lr, betas=betas, eps=loop.adam_eps)
    return torch.optim.AdamW(groups, lr=loop.lr, betas=betas, eps=loop.adam_eps)


def linear_warmup_decay(step: int, warmup_steps: int, max_steps: int) -> float:
    """LR multiplier before optimizer step `step` (0-based): (step+1)/warmup during the
    warmup, then linear decay reaching 0 after the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max_steps - step
    return max(0.0, remaining / max(1, max_steps - warmup_steps))


def build_scheduler(optimizer: torch.optim.Optimizer,
                    loop: LoopSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then linear decay over `loop.max_steps` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_warmup_decay(s, loop.warmup_steps, loop.max_steps))


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """L2 norm of all gradients (for logging when clipping is off)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
