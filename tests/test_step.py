"""workflows/training/step.py without Ray: token-weighted losses over a step's global batch
(however it is split into workers and micro-batches), no host sync between log steps, and
the precision a run resolves to."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from tests.helpers import MASK, PAD, VOCAB, tiny_pretrain_task as task
from workflows.config import LoopSettings
from workflows.training import loop as L
from workflows.training.step import MetricWindow, StepRunner, count_tokens, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _micro_batches(n: int = 4, rows: int = 2, T: int = 10, seed: int = 0):
    """`n` micro-batches of the same width whose masked-token counts differ (2 to 11)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, VOCAB, (rows, T), generator=g)
        mask = torch.ones_like(ids)
        mask[1, T - 1 - 2 * i:] = 0  # rows of different lengths
        ids = ids.masked_fill(mask == 0, PAD)
        labels = torch.full_like(ids, -100)
        picked = torch.randperm(rows * T, generator=g)[: 2 + 3 * i]
        labels.view(-1)[picked] = ids.view(-1)[picked]
        labels = labels.masked_fill(mask == 0, -100)
        out.append(dict(input_ids=ids.masked_fill(labels != -100, MASK), attention_mask=mask,
                        token_type_ids=torch.zeros_like(ids), labels=labels,
                        next_sentence_label=torch.randint(0, 2, (rows,), generator=g)))
    return out


def _nsp_task():
    from bert_core import BertConfig

    t = task("nsp")
    t.model_config = BertConfig.preset(
        "tiny", vocab_size=VOCAB, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0).to_hf_dict("BertForPreTraining")
    return t


def _gradient(t, model0, batches, workers: int, accum: int, weighted: bool = True):
    """The step's gradient when `workers` x `accum` micro-batches make the global batch:
    each simulated worker accumulates its micro-batches, the count of predicted tokens is
    summed over all workers (what the all-reduce gives), and the gradients are averaged
    over the workers (what DDP does)."""
    total = sum(t.loss_tokens(b) for b in batches)
    grads = []
    for w in range(workers):
        model = copy.deepcopy(model0)
        runner = StepRunner(model, LoopSettings(grad_accum=accum), CPU, world=workers)
        runner.sum_over_workers = lambda local: torch.tensor(float(total))  # noqa: B023
        mine = batches[w * accum:(w + 1) * accum]
        if weighted:
            runner.begin_cycle(t, mine)
        for batch in mine:
            runner.forward_backward(t, batch)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(grads).mean(0)


def test_token_weighted_gradient_is_the_same_however_the_global_batch_is_split():
    t = _nsp_task()
    torch.manual_seed(0)
    model = t.build_model()
    batches = _micro_batches()
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}  # one micro-batch
    reference = _gradient(t, model, [whole], 1, 1)
    for workers, accum in ((1, 4), (4, 1), (2, 2)):
        got = _gradient(t, model, batches, workers, accum)
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-5,
                                   msg=f"{workers} workers x {accum} micro-batches")
    # Means per micro-batch (the old way) weigh a micro-batch of 2 masked tokens like one
    # of 11: not the gradient of the global batch.
    assert not torch.allclose(_gradient(t, model, batches, 2, 2, weighted=False), reference,
                              atol=1e-4, rtol=1e-3)


def test_token_classification_loss_is_token_weighted(tiny_token_task):
    t, batches = tiny_token_task
    torch.manual_seed(0)
    model = t.build_model()
    counts = [t.loss_tokens(b) for b in batches]
    assert len(set(counts)) > 1  # micro-batches with different numbers of labelled words
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    reference = _gradient(t, model, [whole], 1, 1)
    for workers, accum in ((1, 4), (4, 1), (2, 2)):
        got = _gradient(t, model, batches, workers, accum)
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-5,
                                   msg=f"{workers} workers x {accum} micro-batches")


@pytest.fixture
def tiny_token_task(tmp_path):
    """A token-classification FinetuneTask on a fresh tiny encoder, and 4 collated
    micro-batches of one width with 3..10 labelled tokens."""
    from bert_core import BertConfig, BertModel
    from workflows.training.finetune_task import FinetuneTask

    config = BertConfig.preset("tiny", vocab_size=VOCAB, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    BertModel(config).save_pretrained(tmp_path / "base")
    t = FinetuneTask(task="token-cls", base_dir=str(tmp_path / "base"),
                     tokenizer_dir=str(tmp_path / "base"), labels=["O", "B", "I"], pad_id=PAD,
                     meta={"task": "token-cls"})
    batches = []
    for i, b in enumerate(_micro_batches(seed=3)):
        labels = torch.full_like(b["labels"], -100)
        labels[0, 1:4 + 2 * i] = torch.arange(3 + 2 * i) % 3
        batches.append(dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            token_type_ids=b["token_type_ids"],
                            labels=labels.masked_fill(b["attention_mask"] == 0, -100)))
    return t, batches


# --- no host sync between log steps ------------------------------------------------------

SYNCS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "nonzero", "cpu")


@contextlib.contextmanager
def counting_syncs(calls: list[str]):
    """Record every call of a Tensor method that would make the host wait for a GPU."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return method(self, *args, **kwargs)
        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _train(t, model, loop, batches, calls_by_step):
    """The worker loop's step sequence (worker_loop, without Ray): the step's micro-batches
    on the device with their counts, begin_cycle, forward/backward, the window, the
    optimizer step; at log steps the summary and the finite-loss check."""
    runner = StepRunner(model, loop, CPU)
    window = MetricWindow()
    for step in range(1, loop.max_steps + 1):
        calls: list[str] = []
        with counting_syncs(calls):
            mine = [L._to_device(b, CPU, t) for b in batches[:loop.grad_accum]]
            runner.begin_cycle(t, mine)
            for batch in mine:
                loss, metrics = runner.forward_backward(t, batch)
                tokens, samples = count_tokens(batch)
                window.add(loss, metrics, tokens, samples)
            info = runner.optimizer_step()
        calls_by_step[step] = calls
        if step % loop.log_every == 0:
            logged: list[str] = []
            with counting_syncs(logged):
                summary = L.train_summary(window, 1, 1, CPU)
                runner.check_finite(step)
                values = L.host_values(info)
            calls_by_step[f"log {step}"] = logged
            window.reset()
            assert summary["train_loss"] > 0 and values["grad_norm"] > 0
    return runner


def _collated(t, n: int):
    from tests.helpers import FakeShard, token_rows as rows

    rng = np.random.default_rng(0)
    return [t.collate(b, rng) for b in FakeShard(rows(4 * n)).iter_batches(4)]


@pytest.fixture(scope="module")
def compiled_mlm():
    """A tiny MLM task, its model compiled (AOTAutograd, no codegen: fast) and two batches;
    one compile for the tests of this module."""
    t = task("mlm")
    torch.manual_seed(0)
    model = t.build_model()
    model.compile(backend="aot_eager", fullgraph=True)
    batches = _collated(t, 2)
    _train(t, model, LoopSettings(grad_accum=2, batch_size=4, max_steps=1, log_every=1,
                                  warmup_steps=0), batches, {})  # compiles, uncounted
    return t, model, batches


@pytest.mark.slow  # a compile: minutes on a loaded 2-core machine
@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_no_host_sync_between_log_steps(optimizer, compiled_mlm):
    """Compiled (the static-shape model), a step reads nothing back from the device: loss,
    metrics and gradient norm stay tensors until a log step reads them, once."""
    t, model, batches = compiled_mlm
    loop = LoopSettings(grad_accum=2, batch_size=4, max_steps=6, log_every=3, warmup_steps=0,
                        optimizer=optimizer, lr=1e-3)
    calls: dict = {}
    _train(t, model, loop, batches, calls)
    steps = {k: v for k, v in calls.items() if isinstance(k, int)}
    assert steps == {s: [] for s in range(1, 7)}, steps
    assert calls["log 3"] and calls["log 6"]  # the counter sees what the log steps read


def test_eager_bert_core_syncs_and_the_counter_sees_it():
    """The eager model unpads (a data-dependent shape: a read of the mask), which is why
    the no-sync guarantee is for the whole-model compile (what --compile runs on CUDA; on
    CPUs it compiles the layers and keeps this unpadding, where a sync costs nothing)."""
    t = task("mlm")
    model = t.build_model()
    batch = _collated(t, 1)[0]
    calls: list[str] = []
    with counting_syncs(calls):
        t.compute_loss(model, batch)
    assert "__bool__" in calls


def test_precision_auto_is_fp32_on_cpu_and_explicit_choices_stay():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    runner = StepRunner(task("mlm").build_model(), LoopSettings(precision="auto"), CPU)
    assert runner.precision == "fp32" and not runner.scaler.is_enabled()
