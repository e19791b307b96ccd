"""One optimizer step's mechanics, and the metrics between two logs (pure torch: unit
tested without Ray, used by the worker loop in workflows.training.loop).

`StepRunner` owns forward/backward with gradient accumulation and precision (autocast
bf16/fp16, a gradient scaler for fp16), clipping, the optimizer and the schedule. Under
fp16 it counts the steps the scaler skipped (metric `scaler_skipped_steps`) and stops the
run after `max_nonfinite_steps` steps in a row with a non-finite loss: a diverged fp16 run
would otherwise skip every step to the end and learn nothing.
`MetricWindow` sums per-micro-batch metrics; `mfu` turns throughput into model FLOPs
utilisation.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from torch import nn

from workflows.config import LoopSettings
from workflows.training.contracts import TrainingError
from workflows.training.optim import build_optimizer, build_scheduler, global_grad_norm

# Peak dense bf16/fp16 FLOP/s of common GPUs, for model FLOPs utilisation (MFU).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


class StepRunner:
    """Forward/backward with accumulation and precision, and the optimizer step.

    Used by the Ray worker loop and directly by unit tests (no Ray needed).
    """

    def __init__(self, model: nn.Module, loop: LoopSettings, device: torch.device,
                 raw_model: nn.Module | None = None, accum: int | None = None,
                 loss_divisor: float | None = None) -> None:
        self.model = model                      # what forward runs through (maybe DDP)
        self.raw_model = raw_model or model     # the parameters
        self.loop = loop
        # Micro-batches of this worker per optimizer step, and what each loss is divided
        # by: `micro-batches per step / workers`, so that DDP's mean over the workers makes
        # the step's gradient the mean over the global batch even when the workers'
        # counts differ (training/rows.py). Default: --grad-accum for both.
        self.accum = accum or loop.grad_accum
        self.loss_divisor = loss_divisor or self.accum
        self.device = device
        self.optimizer = build_optimizer(self.raw_model, loop)
        self.scheduler = build_scheduler(self.optimizer, loop)
        self.scaler = torch.amp.GradScaler(device.type, enabled=loop.precision == "fp16")
        self.step = 0
        self.micro = 0
        self.skipped_steps = 0      # fp16 steps the scaler skipped (inf/NaN gradients)
        self.tokens_seen = 0        # non-padding tokens trained on by all workers (the loop)
        self.nonfinite_run = 0      # optimizer steps in a row with a non-finite loss
        self._cycle_finite = True   # every micro-batch loss of this cycle was finite

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.loop.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.loop.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def forward_backward(self, task: Any,
                         batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        """One micro-batch; gradients are synchronised (DDP) only on the last of a cycle."""
        last = (self.micro + 1) % self.accum == 0
        no_sync = getattr(self.model, "no_sync", None)
        sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_ctx:
            with self.autocast():
                loss, metrics = task.compute_loss(self.model, batch)
            self.scaler.scale(loss / self.loss_divisor).backward()
        self.micro += 1
        value = float(loss.detach())
        self._cycle_finite = self._cycle_finite and math.isfinite(value)
        return value, metrics

    @property
    def cycle_done(self) -> bool:
        return self.micro % self.accum == 0

    def optimizer_step(self) -> dict[str, float]:
        """Unscale, clip, step, schedule; returns the lr used and the gradient norm (under
        fp16 also the loss scale and the steps skipped so far)."""
        fp16 = self.scaler.is_enabled()
        scale = self.scaler.get_scale() if fp16 else 1.0
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        if self.loop.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.loop.max_grad_norm))
        else:
            grad_norm = global_grad_norm(params)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        info = {"lr": lr, "grad_norm": grad_norm}
        if fp16:
            # The scaler lowers its scale exactly when it found inf/NaN and skipped the step.
            self.skipped_steps += int(self.scaler.get_scale() < scale)
            info.update(loss_scale=self.scaler.get_scale(),
                        scaler_skipped_steps=float(self.skipped_steps))
            self._check_divergence()
        self._cycle_finite = True
        return info

    def _check_divergence(self) -> None:
        """Stop an fp16 run whose loss has not been finite for `max_nonfinite_steps` steps."""
        self.nonfinite_run = 0 if self._cycle_finite else self.nonfinite_run + 1
        limit = self.loop.max_nonfinite_steps
        if limit and self.nonfinite_run >= limit:
            raise TrainingError(
                f"fp16 run diverged: the loss was not finite for {self.nonfinite_run} "
                f"optimizer steps in a row (up to step {self.step}; {self.skipped_steps} "
                f"steps skipped by the gradient scaler in all). Lower --lr, raise "
                f"--warmup-steps, or use --precision bf16 (or fp32); "
                f"--max-nonfinite-steps sets how many are tolerated")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step,
                "skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.micro = 0


class MetricWindow:
    """Accumulates per-micro-batch metrics between two logs (see TrainTask docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.tokens = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: float, metrics: dict[str, Any], tokens: int, samples: int) -> None:
        self.n += 1
        self.tokens += tokens
        self.samples += samples
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss
        for k, v in metrics.items():
            v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v

    def summary(self, world_size: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.sums.items():
            if k.endswith("_count"):
                continue
            if k.endswith("_correct"):
                count = self.sums.get(k[: -len("_correct")] + "_count", 0.0)
                if count > 0:
                    out[k[: -len("_correct")] + "_acc"] = v / count
                continue
            out[k] = v / max(1, self.n)
        elapsed = max(1e-9, time.perf_counter() - self.started)
        # Other ranks process as much as rank 0 (equal shards), hence the world factor.
        out["tokens_per_s"] = self.tokens * world_size / elapsed
        out["samples_per_s"] = self.samples * world_size / elapsed
        return out


def count_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(non-padding tokens, sequences) of a collated batch."""
    if "attention_mask" in batch:
        mask = batch["attention_mask"]
        return int(mask.sum()), int(mask.shape[0])
    first = next(iter(batch.values()))
    return int(first.numel()), int(first.shape[0])


def mfu(tokens_per_s: float, n_params: int, device: torch.device, world: int) -> float | None:
    """Model FLOPs utilisation of `world` GPUs: 6 * params FLOPs per token (forward and
    backward, attention ignored) against the GPUs' peak; None on CPUs or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return 6 * n_params * tokens_per_s / (peak * world) if peak else None
