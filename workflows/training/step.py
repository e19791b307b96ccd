"""One optimizer step's mechanics, and the metrics between two logs (pure torch: unit
tested without Ray, used by the worker loop in workflows.training.loop).

`StepRunner` owns forward/backward with gradient accumulation and precision (autocast
bf16/fp16, a gradient scaler for fp16), clipping, the optimizer and the schedule. Under
fp16 it counts the steps the scaler skipped (metric `scaler_skipped_steps`) and stops the
run after `max_nonfinite_steps` steps in a row with a non-finite loss: a diverged fp16 run
would otherwise skip every step to the end and learn nothing.
`MetricWindow` sums per-micro-batch metrics; `mfu` turns throughput into model FLOPs
utilisation.

No host sync between log steps (outside fp16, whose scaler reads its scale every step):
losses, metrics and the gradient norm stay device tensors, summed on the device, and are
read once per log (`MetricWindow.summary`, `host_values`, `check_finite`); token counts
come from the CPU batch before its copy (`to_device`). Token-level losses (masked LM,
token classification) are weighted by token over the whole step: `begin_cycle` sums the
step's predicted tokens over its micro-batches and workers (one all-reduce of a number
on the device) and the task divides each micro-batch's sum of token losses by that count
per micro-batch, so a micro-batch with few masked tokens weighs what its tokens weigh.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from workflows.config import LoopSettings
from workflows.training.contracts import TrainingError
from workflows.training.optim import build_optimizer, build_scheduler, global_grad_norm

# Peak dense bf16/fp16 FLOP/s of common GPUs, for model FLOPs utilisation (MFU).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU that supports it, fp32 elsewhere (CPUs: bf16 autocast is
    slower than fp32 on most); any other choice as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def use_tf32(device: torch.device) -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (tensor cores; 10-bit mantissa
    products, fp32 accumulation), as most training code runs them; nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_model(model: nn.Module, device: torch.device, mode: str | None = None) -> str:
    """`--compile`, in place (parameter names, so checkpoints, unchanged; DDP calls the
    compiled forward). Returns what was compiled: `mode`, by default `compile_mode(device)`.

    "model" (CUDA): the whole model, one graph with static shapes (no unpadding, pads
    masked in SDPA): no host sync in the step, shapes a CUDA graph can replay; not
    measured on a GPU yet. "layers" (CPUs): the embeddings and encoder layers only
    and the masked-LM loss (`compile_layers`), the eager unpadding around them. On a CPU a host sync costs
    nothing and the linear layers are the time, so running pads through them lost more
    than compiling gains (`mini`, lengths 32..128: the whole model 0.63x eager's
    tokens/s, the layers 0.98-0.99x, with the masked-LM loss compiled too 1.03x;
    bench/model_throughput.py --compile, docs/benchmarks.md).
    The layers take dropout's random numbers from aten (`fallback_random`): inductor's own
    generator made the compiled layers 0.88x eager, most of it the attention dropout over
    (B, heads, T, T).
    """
    mode = mode or compile_mode(device)
    if mode == "model":
        model.compile(fullgraph=True)
    else:
        model.compile_layers(options={"fallback_random": True})  # type: ignore[operator]
    return mode


def compile_mode(device: torch.device) -> str:
    """What `compile_model` compiles on `device`: "model" on CUDA, "layers" elsewhere."""
    return "model" if device.type == "cuda" else "layers"


class DeviceBatch(dict):
    """A collated batch on its device, with counts taken from its CPU copy (reading them
    from the device copy would make the host wait for the GPU)."""

    tokens: int = 0                 # non-padding tokens
    samples: int = 0                # sequences
    loss_tokens: int | None = None  # tokens a token-level loss predicts (task.loss_tokens)


def to_device(batch: dict[str, torch.Tensor], device: torch.device,
              task: Any = None) -> DeviceBatch:
    """`batch` (on the CPU) copied to `device`, its counts taken first (`DeviceBatch`)."""
    out = DeviceBatch({k: v.to(device, non_blocking=True) for k, v in batch.items()})
    out.tokens, out.samples = _cpu_counts(batch)
    count = getattr(task, "loss_tokens", None)
    out.loss_tokens = count(batch) if count is not None else None
    return out


def _cpu_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "attention_mask" in batch:
        mask = batch["attention_mask"]
        return int(np.count_nonzero(mask.numpy())), int(mask.shape[0])
    first = next(iter(batch.values()))
    return int(first.numel()), int(first.shape[0])


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over every worker, left on its device (unchanged outside a process
    group); the host does not wait for it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StepRunner:
    """Forward/backward with accumulation and precision, and the optimizer step.

    Used by the Ray worker loop and directly by unit tests (no Ray needed). Call
    `begin_cycle` with a step's micro-batches before the first of them for token-weighted
    losses; without it every micro-batch's loss is its own mean (as before).
    """

    def __init__(self, model: nn.Module, loop: LoopSettings, device: torch.device,
                 raw_model: nn.Module | None = None, accum: int | None = None,
                 loss_divisor: float | None = None, world: int | None = None) -> None:
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
        self.world = world or _world_size()
        self.precision = resolve_precision(loop.precision, device)
        use_tf32(device)
        self.optimizer = build_optimizer(self.raw_model, loop)
        self.scheduler = build_scheduler(self.optimizer, loop)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.sum_over_workers = all_reduce_sum  # the step's token count over the workers
        self.tokens_per_micro: torch.Tensor | None = None  # set by begin_cycle
        self.step = 0
        self.micro = 0
        self.skipped_steps = 0      # fp16 steps the scaler skipped (inf/NaN gradients)
        self.tokens_seen = 0        # non-padding tokens trained on by all workers (the loop)
        self.nonfinite_run = 0      # optimizer steps in a row with a non-finite loss
        # On the device: whether every loss of this cycle was finite (fp16's check), and
        # the non-finite losses since the last `check_finite`.
        self._cycle_finite: torch.Tensor | bool = True
        self._nonfinite: torch.Tensor | int = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def begin_cycle(self, task: Any, batches: list[dict[str, torch.Tensor]]) -> None:
        """Before a step's first micro-batch, given this worker's micro-batches of the step:
        for a task with `loss_tokens`, the step's predicted tokens summed over micro-batches
        and workers, per micro-batch of the global batch (what `compute_loss` divides a
        micro-batch's summed token losses by). Counts come from the CPU copies
        (`DeviceBatch.loss_tokens`); the sum stays on the device."""
        count = getattr(task, "loss_tokens", None)
        counts = [b.loss_tokens if isinstance(b, DeviceBatch) else
                  (count(b) if count is not None else None) for b in batches]
        if not counts or any(c is None for c in counts):
            self.tokens_per_micro = None
            return
        total = self.sum_over_workers(
            torch.tensor(float(sum(counts)), dtype=torch.float32, device=self.device))
        # loss_divisor x workers = micro-batches in the global batch (loop.rank_accumulation)
        self.tokens_per_micro = total.clamp_min(1.0) / (self.loss_divisor * self.world)

    def forward_backward(self, task: Any, batch: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch; gradients are synchronised (DDP) only on the last of a cycle.
        Returns the loss (a detached device tensor: reading it is the caller's sync) and
        the task's metrics."""
        last = (self.micro + 1) % self.accum == 0
        no_sync = getattr(self.model, "no_sync", None)
        sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_ctx:
            with self.autocast():
                if self.tokens_per_micro is not None:
                    loss, metrics = task.compute_loss(self.model, batch,
                                                      tokens_per_micro=self.tokens_per_micro)
                else:
                    loss, metrics = task.compute_loss(self.model, batch)
            self.scaler.scale(loss / self.loss_divisor).backward()
        self.micro += 1
        loss = loss.detach()
        finite = torch.isfinite(loss)
        self._cycle_finite = finite & self._cycle_finite
        self._nonfinite = (~finite).to(torch.int32) + self._nonfinite
        return loss, metrics

    def check_finite(self, step: int) -> None:
        """At a log step (a host read): stop when a loss since the last check was not finite
        (fp16 instead counts skipped steps, see `_check_divergence`)."""
        bad, self._nonfinite = int(self._nonfinite), 0
        if bad and self.precision != "fp16":
            raise TrainingError(f"the loss was not finite in {bad} micro-batches up to step "
                                f"{step}: lower --lr or use --precision fp32")

    @property
    def cycle_done(self) -> bool:
        return self.micro % self.accum == 0

    def optimizer_step(self) -> dict[str, Any]:
        """Unscale, clip, step, schedule; returns the lr used and the gradient norm (a
        device tensor; `host_values` reads it), under fp16 also the loss scale and the
        steps skipped so far."""
        fp16 = self.scaler.is_enabled()
        scale = self.scaler.get_scale() if fp16 else 1.0
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # A device tensor: logged at log steps (host_values), never read in between.
        if self.loop.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.loop.max_grad_norm)
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
        self.tokens_per_micro = None  # the next step's begin_cycle counts its own
        return info

    def _check_divergence(self) -> None:
        """Stop an fp16 run whose loss has not been finite for `max_nonfinite_steps` steps."""
        self.nonfinite_run = 0 if bool(self._cycle_finite) else self.nonfinite_run + 1
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


def host_values(values: dict[str, Any]) -> dict[str, float]:
    """`values` as floats, the tensors among them read in one transfer (a log step's)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        device = next(iter(tensors.values())).device
        read = torch.stack([v.detach().to(device, torch.float64).reshape(())
                            for v in tensors.values()]).tolist()
        out.update(zip(tensors, read))
    return {k: out[k] for k in values}


class MetricWindow:
    """Accumulates per-micro-batch metrics between two logs (see TrainTask docstring).
    Tensor values are summed on their device and read once, by `summary`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.n = 0
        self.tokens = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor | float, metrics: dict[str, Any], tokens: int,
            samples: int) -> None:
        self.n += 1
        self.tokens += tokens
        self.samples += samples
        for k, v in (("loss", loss), *metrics.items()):
            if isinstance(v, torch.Tensor):
                v = v.detach().double()
            self.sums[k] = v + self.sums.get(k, 0.0)

    def summary(self, world_size: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in host_values(self.sums).items():
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
    """(non-padding tokens, sequences) of a collated batch: those its CPU copy had for a
    `DeviceBatch`, else counted (on a device batch, a host read)."""
    if isinstance(batch, DeviceBatch):
        return batch.tokens, batch.samples
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
