"""bert_core under torch.compile: every head traces as one graph (no graph break, so no
device->host sync inside the step), and the compiled static-shape path (SDPA over the
padded batch, a fixed-size MLM gather) gives eager's numbers (unpadding, sparse MLM).
Regional compilation (`compile_layers`, what --compile runs on CPUs) compiles each layer
as one graph, shared by all layers and batch shapes, and gives eager's numbers too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import bert_core
from bert_core import BertConfig

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, V = 3, 12, 96


def _config(**kw) -> BertConfig:
    # The tiny preset with a small vocabulary: compile time grows with the decoder's size.
    return BertConfig.preset("tiny", vocab_size=V, max_position_embeddings=32,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch: a full row, a half row, and a row of one real token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types * mask)


def _mlm_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[0, [1, 3, 4, 8, 10]] = ids[0, [1, 3, 4, 8, 10]]  # 5 masked: more than K=4
    labels[1, [2, 5]] = ids[1, [2, 5]]
    return labels  # row 2: none


def _case(name: str):
    """(model, batch with labels, [(name, eager value -> comparable)]) of one head."""
    batch = _inputs()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if name == "pretraining":
        model = bert_core.BertForPreTraining(_config())
        model.max_predictions = 5  # compiled: a gather of 5 per row (no row has more)
        labels = dict(labels=_mlm_labels(ids, mask), next_sentence_label=torch.tensor([0, 1, 1]))
    elif name == "mlm":
        model = bert_core.BertForMaskedLM(_config())  # compiled: every position decoded
        labels = dict(labels=_mlm_labels(ids, mask))
    elif name == "seq-cls":
        model = bert_core.BertForSequenceClassification(_config(num_labels=3))
        labels = dict(labels=torch.tensor([0, 2, 1]))
    elif name == "token-cls":
        model = bert_core.BertForTokenClassification(_config(num_labels=4))
        tags = torch.randint(0, 4, (B, T), generator=torch.Generator().manual_seed(1))
        labels = dict(labels=tags.masked_fill(mask == 0, -100))
    else:
        model = bert_core.BertForQuestionAnswering(_config())
        labels = dict(start_positions=torch.tensor([2, 1, 0]),
                      end_positions=torch.tensor([5, 3, 20]))  # 20: truncated away
    return model, {**batch, **labels}


HEADS = ["pretraining", "mlm", "seq-cls", "token-cls", "qa"]


def _outputs(name: str, out, batch) -> dict[str, torch.Tensor]:
    """The values a user reads, at the positions where they mean something."""
    real = batch["attention_mask"].bool()
    if name in ("pretraining", "mlm"):
        logits = out.prediction_logits if name == "pretraining" else out.logits
        values = dict(loss=out.loss, count=out.mlm_count, correct=out.mlm_correct)
        if logits.shape[:2] == (B, T):  # static shapes, every position decoded
            logits = logits[batch["labels"] != -100]
        if logits.dim() == 2:  # eager (M, V), or the line above; not a (B, K, V) gather
            values["logits"] = logits
        if name == "pretraining":
            values.update(nsp=out.seq_relationship_logits, nsp_correct=out.nsp_correct)
        return values
    if name == "token-cls":
        return dict(loss=out.loss, logits=out.logits[real])
    if name == "qa":
        return dict(loss=out.loss, start=out.start_logits[real], end=out.end_logits[real])
    return dict(loss=out.loss, logits=out.logits)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_traces_as_one_graph(name):
    torch._dynamo.reset()
    model, batch = _case(name)
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    # inference without labels (what predict runs) too
    no_labels = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    explained = torch._dynamo.explain(model)(**no_labels)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def _loss_and_grads(model, batch, run=None):
    """`run` (default: the model itself) computes the loss; the gradients are the model's."""
    model.zero_grad()
    out = (model if run is None else run)(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", HEADS)
def test_compiled_step_equals_eager(name):
    """fullgraph compile (AOTAutograd: forward and backward graphs) of a training step gives
    eager's loss, outputs at real positions and gradients. The static path differs from
    eager's in what it computes (every padded token, a gathered MLM decoder), not in the
    maths; inductor's own kernels are checked by the slow test below."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, batch = _case(name)
    model.train()  # dropout is 0: train mode exercises the same code as a training step
    eager_out, eager_grads = _loss_and_grads(model, batch)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = _loss_and_grads(model, batch, compiled)
    got, want = _outputs(name, out, batch), _outputs(name, eager_out, batch)
    for key in got:  # all of want's but the gathered (B, K, V) MLM logits
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)
    assert grads.keys() == eager_grads.keys()
    for key in eager_grads:
        torch.testing.assert_close(grads[key], eager_grads[key], atol=1e-5, rtol=1e-5,
                                   msg=key)


@pytest.mark.parametrize("name", ["pretraining", "token-cls"])
def test_compiled_layers_equal_eager_with_one_graph_for_all(name):
    """compile_layers: the embeddings, the layers (and the MLM loss) compile with
    fullgraph=True (a graph break would raise) into one graph each: every layer and a
    second batch shape reuse the first layer's (dynamic shapes, no recompile). Loss, outputs at real positions and
    gradients are eager's: the compiled layers run on the same unpadded tokens."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, batch = _case(name)
    model.train()  # dropout is 0
    compiled = copy.deepcopy(model)
    compiled.compile_layers(backend="aot_eager")
    shorter = {k: (v[:, :9] if v.dim() == 2 else v) for k, v in batch.items()}  # (B, 9)
    for inputs in (batch, shorter):
        eager_out, eager_grads = _loss_and_grads(model, inputs)
        out, grads = _loss_and_grads(compiled, inputs)
        got, want = _outputs(name, out, inputs), _outputs(name, eager_out, inputs)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)
        assert grads.keys() == eager_grads.keys()
        for key in eager_grads:
            torch.testing.assert_close(grads[key], eager_grads[key], atol=1e-5, rtol=1e-5,
                                       msg=key)
    graphs = 3 if name == "pretraining" else 2  # + the masked-LM loss (MaskedLMLoss)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert not counters["graph_break"]


def test_static_mlm_gather_decodes_the_first_k_of_each_row():
    """max_predictions=K keeps Google's fixed K per row: a row with more masked tokens has
    its first K predicted (the collate never masks more than K); loss per decoded token."""
    torch._dynamo.reset()
    model, batch = _case("mlm")
    model.eval()
    model.max_predictions = 4
    with torch.no_grad():
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(**batch)
        eager = model(**batch)
    assert out.logits.shape == (B, 4, V)
    assert out.mlm_count.item() == 6 and eager.mlm_count.item() == 7  # row 0 keeps 4 of 5
    labels = batch["labels"]
    first_k = labels.clone()
    first_k[0, 10] = -100  # the 5th masked position of row 0
    with torch.no_grad():
        reference = model(**{**batch, "labels": first_k})
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-5, rtol=1e-5)
    decoded = out.logits[0]  # row 0: positions 1, 3, 4, 8 in order
    torch.testing.assert_close(decoded, reference.logits[:4], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("way", ["model", "layers"])
def test_inductor_pretraining_step_equals_eager(way):
    """The real compiler (inductor, C++ kernels on CPU), the whole model (static shapes)
    and the layers (compile_layers): loss and gradients within 1e-5."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, batch = _case("pretraining")
    eager_out, eager_grads = _loss_and_grads(model, batch)
    if way == "model":
        run = torch.compile(model, fullgraph=True)
    else:
        run = copy.deepcopy(model)
        run.compile_layers(options={"fallback_random": True})  # as --compile on a CPU
    out, grads = (_loss_and_grads(model, batch, run) if way == "model"
                  else _loss_and_grads(run, batch))
    got, want = _outputs("pretraining", out, batch), _outputs("pretraining", eager_out, batch)
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)
    for key in eager_grads:
        torch.testing.assert_close(grads[key], eager_grads[key], atol=1e-5, rtol=1e-5,
                                   msg=key)
