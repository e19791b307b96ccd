"""Optimisers and schedules of the training loop (pure torch; unit-tested without Ray).

- `param_groups`: decay everything except biases and LayerNorm parameters (BERT recipe).
- `Lamb`: layer-wise adaptive moments (You et al., 2019, "Large Batch Optimization for
  Deep Learning"); torch has no LAMB of its own. Multi-tensor by default: a dozen
  `torch._foreach_*` kernels per step for all tensors of a group (per-tensor Python ran
  about 16 ops per tensor, thousands of launches per BERT-large step on a GPU).
- `build_optimizer`: AdamW is torch's fused kernel where torch has one for the device.
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
    with "adapt": False (biases, LayerNorm in `param_groups`) takes plain Adam steps.

    `foreach=True` (the default) updates all tensors of a group with `torch._foreach_*`
    kernels and never reads a device value on the host; `foreach=False` is the same
    algorithm tensor by tensor (the reference the tests compare against). The state is
    the same either way (`step`, `exp_avg`, `exp_avg_sq`), so checkpoints move between them.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, foreach: bool = True) -> None:
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay, "adapt": True})
        self.foreach = foreach
        # Each tensor's step count as a Python number, so that bias corrections never read
        # a tensor; state["step"] (a host tensor, what checkpoints hold) follows it.
        self._steps: dict[torch.Tensor, int] = {}
        # Each tensor's update buffer on `scratch_devices` (not state: never checkpointed).
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}

    # Devices whose allocator caches nothing: the multi-tensor step keeps its buffers.
    scratch_devices: tuple[str, ...] = ("cpu",)

    def _scratch_for(self, p: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(p)
        if buf is None:
            buf = self._scratch[p] = torch.empty_like(p, dtype=torch.float32)
        return buf

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state_dict)
        self._steps = {}  # read again from the loaded state["step"], once

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (torch API)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    self._steps[p] = 0
                elif p not in self._steps:  # restored: read the host tensor, once
                    self._steps[p] = int(state["step"])
                self._steps[p] += 1
                state["step"].fill_(self._steps[p])
            if self.foreach:
                by_device: dict[torch.device, list[torch.Tensor]] = {}
                for p in params:
                    by_device.setdefault(p.device, []).append(p)
                for same_device in by_device.values():
                    self._foreach_step(group, same_device)
            else:
                for p in params:
                    self._single_step(group, p)
        return loss

    def _single_step(self, group: dict[str, Any], p: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        grad = p.grad.float()
        t = self._steps[p]
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

    def _foreach_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """`_single_step` for tensors on one device, a kernel per op for all of them.

        m_hat / (sqrt(v_hat) + eps) is computed as (m * c) / (sqrt(v) + eps * s) with
        s = sqrt(1 - beta2^t), c = s / (1 - beta1^t): the same quotient in fewer passes.
        With the trust ratio, u = c u' where u' = m / (sqrt(v) + eps s) + (wd / c) w, and
        ratio(u) u = ratio(u') u': the multiplication by c is left out; the ratio is
        applied in the parameters' own update (an addcmul), and without it c goes into
        the learning rate. No value is read on the host, and no state-sized tensor is
        allocated on the CPU (`scratch_devices`): there a step costs its passes over
        the state (memory bound) plus its page faults.
        """
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        states = [self.state[p] for p in params]
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
        weights = [p if p.dtype == torch.float32 else p.float() for p in params]
        steps = [self._steps[p] for p in params]
        # The tensors of a group share their step count unless some once had no grad:
        # then the per-tensor constants are lists.
        same = len(set(steps)) == 1
        root2 = [math.sqrt(1 - beta2 ** t) for t in steps]
        scale = [s / (1 - beta1 ** t) for s, t in zip(root2, steps)]  # c
        torch._foreach_lerp_(ms, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        eps_s = eps * root2[0] if same else [eps * s for s in root2]
        if params[0].device.type in self.scratch_devices:
            # updates = m / (sqrt(v) + eps s), in buffers kept between steps: torch's CPU
            # allocator keeps nothing, and two fresh state-sized tensors a step cost
            # more in page faults than the two passes (copy, reciprocal) this adds.
            updates = [self._scratch_for(p) for p in params]
            torch._foreach_copy_(updates, vs)
            torch._foreach_sqrt_(updates)
            torch._foreach_add_(updates, eps_s)
            torch._foreach_reciprocal_(updates)
            torch._foreach_mul_(updates, ms)
        else:  # a caching allocator (CUDA): fewer passes
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, eps_s)
            updates = torch._foreach_div(ms, denom)
            del denom
        if wd and same:
            torch._foreach_add_(updates, weights, alpha=wd / scale[0])
        elif wd:
            torch._foreach_add_(updates, torch._foreach_mul(weights, [wd / c for c in scale]))
        if group["adapt"]:
            norms = torch.stack(torch._foreach_norm([*weights, *updates])).view(2, -1)  # (2, n)
            w_norm, u_norm = norms[0], norms[1]
            # Trust ratio 1 (a step of u = c u') where either norm is 0.
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                scale[0] if same else w_norm.new_tensor(scale))  # (n,)
            torch._foreach_addcmul_(weights, updates, list(ratio.unbind(0)), value=-lr)
        elif same:
            torch._foreach_add_(weights, updates, alpha=-lr * scale[0])
        else:
            torch._foreach_mul_(updates, scale)
            torch._foreach_add_(weights, updates, alpha=-lr)
        for p, w in zip(params, weights):
            if w is not p:  # a low-precision parameter: its fp32 copy took the step
                p.copy_(w)


def build_optimizer(model: nn.Module, loop: LoopSettings) -> torch.optim.Optimizer:
    """AdamW or LAMB over `param_groups(model)` with the loop's hyper-parameters.

    Build it after the model is on its device: AdamW takes torch's fused kernel when every
    parameter is a floating tensor on a device torch has one for (CUDA, CPU, ...), and
    its multi-tensor (`foreach`) one otherwise."""
    groups = param_groups(model, loop.weight_decay)
    betas = (loop.adam_beta1, loop.adam_beta2)
    if loop.optimizer == "lamb":
        return Lamb(groups, lr=loop.lr, betas=betas, eps=loop.adam_eps)
    return adamw(groups, lr=loop.lr, betas=betas, eps=loop.adam_eps)


def adamw(groups: list[dict[str, Any]], **hyper: Any) -> torch.optim.AdamW:
    """torch's AdamW, fused where torch has a fused kernel for the parameters' device and
    dtype (it refuses the others with a RuntimeError), multi-tensor otherwise."""
    try:
        return torch.optim.AdamW(groups, **hyper, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, **hyper, foreach=True)


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


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor | float:
    """L2 norm of all gradients (for logging when clipping is off), left on the device."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).norm() if grads else 0.0


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
