"""Training throughput: bert_core.BertForPreTraining vs transformers.BertForPreTraining.

Both models start from the same weights (ours saved, transformers loads the folder) and run
the same batches: forward + backward + AdamW step, MLM (15% of real tokens) + NSP labels,
sequence lengths spread over 32..128 and padded to each batch's longest, as the pretraining
collator does. Steps of the two models alternate, so a machine shared with other work slows
both alike. Throughput counts real (non-pad) tokens per second.

On CUDA (`--device cuda --precision bf16`) it also reports model FLOPs utilisation for
`base` on full 128-token sequences, with the FLOP formula and the peak it assumes printed.

`--compile` compares bert_core with itself instead: eager (unpadding, sparse MLM decoder)
against the model compiled as `--compile` compiles it on this device
(`workflows.training.step.compile_model`): on CPUs the embeddings and encoder layers
(`compile_layers`: dynamic shapes, the eager unpadding around them, the same batches as
eager), on CUDA the whole model (`fullgraph=True`, static shapes: SDPA over the padded
batch, MLM decoder on a gather of max_predictions=20 per row, batches padded to 128: one
shape). Same weights and batches; compile time (the first two steps) is printed apart and
left out of the rates. `--variants` adds the other way to compile. `--optimizer` times
one optimizer step on BERT-base's parameters: LAMB (multi-tensor and per-tensor) against
torch's AdamW (foreach, fused, per-tensor).

    python bench/model_throughput.py                      # CPU, mini and base (~4 min on 2 cores)
    python bench/model_throughput.py --device cuda --precision bf16
    python bench/model_throughput.py --threads 1 --clock cpu   # on a busy shared machine
    python bench/model_throughput.py --compile --variants --sizes mini
    python bench/model_throughput.py --optimizer --sizes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Default batch sizes keep the CPU run short; GPUs get batches that fill them.
CPU_BATCH = {"tiny": 32, "mini": 32, "base": 8, "large": 4}
GPU_BATCH = {"tiny": 256, "mini": 256, "base": 64, "large": 32}
CPU_STEPS = {"tiny": 10, "mini": 10, "base": 3, "large": 2}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def make_batches(n: int, batch_size: int, vocab: int, lengths: tuple[int, int],
                 seed: int) -> list[dict[str, torch.Tensor]]:
    """Pretraining batches like the collator's: [CLS] A [SEP] B [SEP], right-padded, 15% MLM."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(lengths[0], lengths[1] + 1, (batch_size,), generator=g)
        T = int(lens.max())
        ids = torch.randint(1000, vocab, (batch_size, T), generator=g)
        mask = (torch.arange(T)[None, :] < lens[:, None]).long()  # (B, T)
        types = torch.zeros_like(ids)
        for i, n_tok in enumerate(lens.tolist()):
            ids[i, 0], ids[i, n_tok // 2], ids[i, n_tok - 1] = 101, 102, 102
            types[i, n_tok // 2 + 1:n_tok] = 1
        ids[mask == 0] = 0
        pick = (torch.rand(batch_size, T, generator=g) < 0.15) & mask.bool()
        pick[:, 0] = False
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        ids = ids.masked_fill(pick, 103)  # [MASK]
        out.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                        labels=labels,
                        next_sentence_label=torch.randint(0, 2, (batch_size,), generator=g)))
    return out


def build_pair(size: str, device: str):
    """(bert_core model, transformers model) with identical weights, in train mode."""
    import transformers

    import bert_core

    config = bert_core.BertConfig.preset(size)
    torch.manual_seed(0)
    ours = bert_core.BertForPreTraining(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        ref = transformers.BertForPreTraining.from_pretrained(tmp, attn_implementation="sdpa")
    return ours.to(device).train(), ref.to(device).train()


class Runner:
    """One model + AdamW; `step(batch)` returns seconds for forward+backward+update."""

    def __init__(self, model: torch.nn.Module, device: str, precision: str,
                 clock=time.perf_counter):
        self.model, self.device, self.clock = model, device, clock
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.precision = precision
        self.seconds = 0.0
        self.tokens = 0

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(self, batch: dict[str, torch.Tensor], timed: bool = True) -> float:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self._sync()
        start = self.clock()
        with self._autocast():
            loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        elapsed = self.clock() - start
        if timed:
            self.seconds += elapsed
            self.tokens += int(batch["attention_mask"].sum())
        return float(loss.detach())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def compare(size: str, args: argparse.Namespace) -> tuple[float, float]:
    on_gpu = args.device.startswith("cuda")
    batch_size = args.batch_size or (GPU_BATCH if on_gpu else CPU_BATCH)[size]
    steps = args.steps or (20 if on_gpu else CPU_STEPS[size])
    ours, ref = build_pair(size, args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runners = {"bert_core": Runner(ours, args.device, args.precision, clock),
               "transformers": Runner(ref, args.device, args.precision, clock)}
    batches = make_batches(args.warmup + steps, batch_size, ours.config.vocab_size,
                           (32, 128), seed=1)
    for i, batch in enumerate(batches):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:  # alternate who goes first: fair on a shared machine
            runners[name].step(batch, timed=i >= args.warmup)
    a, b = runners["bert_core"].tokens_per_s, runners["transformers"].tokens_per_s
    print(f"{size:>5}  batch {batch_size:>3} x 32..128  steps {steps:>3}  "
          f"bert_core {a:9.0f} tok/s  transformers {b:9.0f} tok/s  ratio {a / b:5.2f}x",
          flush=True)
    return a, b


def pad_to(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Right-pad a collated batch to `length` (labels with -100, the rest with 0)."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    return {k: (v if v.dim() < 2 else torch.nn.functional.pad(
        v, (0, extra), value=-100 if k == "labels" else 0)) for k, v in batch.items()}


def compare_compiled(size: str, args: argparse.Namespace) -> dict[str, float]:
    """bert_core eager vs compiled as `--compile` compiles on this device (and the
    --variants), alternating steps; steady-state tokens/s, compile time apart."""
    import copy

    import bert_core
    from workflows.training.step import compile_mode, compile_model

    on_gpu = args.device.startswith("cuda")
    batch_size = args.batch_size or (GPU_BATCH if on_gpu else CPU_BATCH)[size]
    steps = args.steps or (20 if on_gpu else CPU_STEPS[size])
    config = bert_core.BertConfig.preset(size)
    torch.manual_seed(0)
    model = bert_core.BertForPreTraining(config).to(args.device).train()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def twin(compile_as: str) -> torch.nn.Module:
        twin = copy.deepcopy(model)
        twin.max_predictions = 20  # what the static path's MLM gather reads per row
        compile_model(twin, torch.device(args.device), compile_as)
        return twin

    default = compile_mode(torch.device(args.device))  # what --compile does on this device
    modes = {"compiled": default}
    if args.variants:
        modes["compiled " + ("layers" if default == "model" else "whole model")] = (
            "layers" if default == "model" else "model")
    runners = {"eager": Runner(model, args.device, args.precision, clock)}
    runners.update({name: Runner(twin(mode), args.device, args.precision, clock)
                    for name, mode in modes.items()})
    # The whole model has static shapes: its batches are padded to 128 (one compile).
    shape = {name: (lambda b: pad_to(b, 128)) if modes.get(name) == "model" else (lambda b: b)
             for name in runners}
    batches = make_batches(2 + args.warmup + steps, batch_size, config.vocab_size, (32, 128),
                           seed=1)
    compile_s = {}
    for name in modes:  # compile (and warm) outside the timed steps: two shapes each
        started = time.perf_counter()
        for batch in batches[:2]:
            runners[name].step(shape[name](batch), timed=False)
        compile_s[name] = time.perf_counter() - started
        print(f"{size:>5}  {name} ({modes[name]}): compile + 2 steps {compile_s[name]:.0f} s "
              f"(wall)", flush=True)
    for i, batch in enumerate(batches[2:]):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            runners[name].step(shape[name](batch), timed=i >= args.warmup)
    rates = {name: r.tokens_per_s for name, r in runners.items()}
    line = "  ".join(f"{name} {rate:8.0f} tok/s ({rate / rates['eager']:.2f}x)"
                     for name, rate in rates.items())
    print(f"{size:>5}  batch {batch_size:>3} x 32..128  steps {steps:>3}  {line}  "
          f"compiled/eager {rates['compiled'] / rates['eager']:5.2f}x", flush=True)
    return rates


def optimizer_step_times(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per optimizer step over BERT-base's parameters (random gradients)."""
    import bert_core
    from workflows.training.optim import Lamb, param_groups

    torch.manual_seed(0)
    model = bert_core.BertForPreTraining(bert_core.BertConfig.preset("base")).to(args.device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = lambda: param_groups(model, 0.01)  # noqa: E731
    opts = {"LAMB foreach": Lamb(groups(), lr=1e-4),
            "LAMB per-tensor": Lamb(groups(), lr=1e-4, foreach=False),
            "AdamW foreach": torch.optim.AdamW(groups(), lr=1e-4, foreach=True),
            "AdamW fused": torch.optim.AdamW(groups(), lr=1e-4, fused=True),
            "AdamW per-tensor": torch.optim.AdamW(groups(), lr=1e-4, foreach=False)}
    seconds = dict.fromkeys(opts, 0.0)
    rounds = args.steps or 6
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for r in range(rounds + 1):  # round 0 creates the state: untimed
        for name in (list(opts) if r % 2 == 0 else list(reversed(opts))):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = clock()
            opts[name].step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                seconds[name] += clock() - start
    n = sum(p.numel() for p in model.parameters())
    ref = seconds["AdamW foreach"]
    print(f"optimizer step, BERT-base ({n / 1e6:.0f}M parameters, {len(list(model.parameters()))}"
          f" tensors), {rounds} steps each, {args.device}, {args.clock} clock:")
    for name, s in seconds.items():
        print(f"  {name:<17} {1000 * s / rounds:8.1f} ms   {s / ref:5.2f}x AdamW foreach")
    return {k: v / rounds for k, v in seconds.items()}


def train_flops_per_token(config, seq_len: int, masked_fraction: float) -> float:
    """6 * (encoder weights) + 12 * L * H * T (attention scores and values, fwd+bwd)
    + 6 * H * V * masked_fraction (the MLM decoder, which runs on masked tokens only).
    The PaLM/Chinchilla convention; embedding lookups count zero."""
    H, L, I, V = (config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                  config.vocab_size)
    per_layer = 4 * H * H + 2 * H * I  # qkv + out projection + feed-forward
    head = H * H  # MLM transform dense
    return (6 * (L * per_layer + head) + 12 * L * H * seq_len
            + 6 * H * V * masked_fraction)


def mfu(args: argparse.Namespace) -> None:
    """bert_core `base` on full 128-token sequences: tokens/s and MFU."""
    import bert_core

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next(
        (v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"MFU: unknown peak for {name!r}; pass --peak-tflops")
        return
    config = bert_core.BertConfig.preset("base")
    torch.manual_seed(0)
    runner = Runner(bert_core.BertForPreTraining(config).to(args.device).train(),
                    args.device, args.precision)
    batch_size = args.batch_size or GPU_BATCH["base"]
    batches = make_batches(args.warmup + (args.steps or 20), batch_size, config.vocab_size,
                           (128, 128), seed=2)
    for i, batch in enumerate(batches):
        runner.step(batch, timed=i >= args.warmup)
    flops = train_flops_per_token(config, 128, 0.15)
    achieved = runner.tokens_per_s * flops / 1e12
    print(f"MFU base seq 128 batch {batch_size} {args.precision} on {name}: "
          f"{runner.tokens_per_s:.0f} tok/s, {achieved:.1f} TFLOP/s of {peak:.0f} peak "
          f"= {100 * achieved / peak:.1f}% (FLOPs/token = 6*N_encoder + 12*L*H*T + "
          f"6*H*V*0.15 = {flops / 1e9:.2f} GFLOP)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["mini", "base"],
                        choices=["tiny", "mini", "base", "large"])
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: per size)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=0, help="default: per size/device")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 = torch.autocast(bfloat16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu = process CPU time, for a machine shared with other work "
                             "(needs --threads 1: idle threads spin and would count)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="accelerator peak for MFU (default: known bf16 peaks)")
    parser.add_argument("--compile", action="store_true",
                        help="bert_core eager vs torch.compile instead of vs transformers")
    parser.add_argument("--variants", action="store_true",
                        help="with --compile: also the other way to compile (the whole model "
                             "with static shapes on CPU, the layers on CUDA)")
    parser.add_argument("--optimizer", action="store_true",
                        help="also time LAMB vs AdamW steps on BERT-base's parameters")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu needs --threads 1 on --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}  precision {args.precision}  torch threads "
          f"{torch.get_num_threads()}  clock {args.clock}  torch {torch.__version__}",
          flush=True)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    for size in args.sizes:
        (compare_compiled if args.compile else compare)(size, args)
    if args.optimizer:
        optimizer_step_times(args)
    if args.device.startswith("cuda") and not args.compile:
        mfu(args)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
