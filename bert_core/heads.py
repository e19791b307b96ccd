"""Task heads on the BERT encoder; each computes its loss when labels are given.

Parameter names follow transformers through `hf_head_names` (see hf_compat), so a folder
saved by `transformers.BertForX` loads here and ours loads there.

The MLM decoder is tied to the word embeddings. With labels it runs only on the masked
positions (about 15% of tokens): the vocabulary projection is most of a small model's
compute, and predictions at unmasked positions never reach the loss. Under torch.compile
(`static_shapes()`) the number of masked positions cannot set a shape, so the decoder runs
on a fixed-size gather of `max_predictions` positions per row (Google's BERT feeds
`masked_lm_positions` the same way), or on every position when that is None; the loss is
then a sum over the labelled ones divided by their count, the same number as eager's.
bench/model_throughput.py measures the two: compiled `mini` on CPU trained at 649 tokens/s
with the gather of 20 per row and 241 with every position (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from bert_core.config import BertConfig
from bert_core.model import ACT_FNS, BertModel, BertPreTrainedModel, static_shapes

IGNORE_INDEX = -100  # label value of positions that carry no loss (transformers' convention)


@dataclasses.dataclass
class PreTrainingOutput:
    """BertForPreTraining output. Counts are detached, for the training loop's accuracy."""

    loss: torch.Tensor | None  # mlm_loss + nsp_loss (what is given)
    mlm_loss: torch.Tensor | None
    nsp_loss: torch.Tensor | None
    # with labels (M, V) at the M masked positions (compiled: (B, K, V), see _mlm); else (B, T, V)
    prediction_logits: torch.Tensor
    seq_relationship_logits: torch.Tensor  # (B, 2)
    mlm_correct: torch.Tensor | None = None  # () int64: masked tokens predicted right
    mlm_count: torch.Tensor | None = None  # () int64: masked tokens
    nsp_correct: torch.Tensor | None = None  # () int64: sentence pairs classified right


@dataclasses.dataclass
class MaskedLMOutput:
    """BertForMaskedLM output (logits (M, V) at masked positions when labels are given;
    compiled: (B, K, V), see `_mlm`)."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None


@dataclasses.dataclass
class ClassifierOutput:
    """Sequence or token classification output: logits (B, C) or (B, T, C)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclasses.dataclass
class QuestionAnsweringOutput:
    """Span prediction: start and end logits over positions, (B, T) each."""

    loss: torch.Tensor | None
    start_logits: torch.Tensor
    end_logits: torch.Tensor


class _HeadModel(BertPreTrainedModel):
    """A task head on `self.bert`; inits only its own modules (the encoder inits itself)."""

    def _init_head(self) -> None:
        for name, child in self.named_children():
            if name != "bert":
                child.apply(self._init_module)


class MLMHead(nn.Module):
    """dense -> act -> LayerNorm -> tied decoder (word embeddings^T) + bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACT_FNS[config.hidden_act]
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """h: (..., H); word_embeddings: (V, H), the encoder's own matrix (tied)."""
        h = self.norm(self.act(self.dense(h)))  # (..., H)
        return F.linear(h, word_embeddings, self.bias)  # (..., V)


class MaskedLMLoss(nn.Module):
    """Summed cross-entropy and right predictions over the decoded masked tokens. A module
    (without parameters) so that `compile_layers` can compile it: fused, the log-softmax,
    its backward and the argmax over the vocabulary are fewer passes over the (M, V)
    logits than eager's kernels (`mini` on CPU: compiled layers 0.99x eager, with this
    1.03x; docs/benchmarks.md)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")  # ()
        correct = (logits.detach().argmax(-1) == targets).sum()  # ()
        return loss, correct


def _mlm(model: BertForPreTraining | BertForMaskedLM, last: torch.Tensor,
         labels: torch.Tensor | None):
    """(logits, loss, correct, count); with labels, the decoder sees masked positions only."""
    tied = model.bert.embeddings.word_embeddings.weight  # (V, H)
    if labels is None:
        return model.mlm(last, tied), None, None, None  # (B, T, V)
    if static_shapes():
        return _mlm_static(model, last, labels, tied)
    selected = labels != IGNORE_INDEX  # (B, T)
    targets = labels[selected]  # (M,)
    logits = model.mlm(last[selected], tied)  # (M, V)
    count = targets.numel()
    loss, correct = model.mlm_loss(logits, targets)
    # Sum / max(count, 1): a batch with no masked token gives loss 0, not NaN.
    return logits, loss / max(count, 1), correct, torch.tensor(count, device=labels.device)


def _mlm_static(model: BertForPreTraining | BertForMaskedLM, last: torch.Tensor,
                labels: torch.Tensor, tied: torch.Tensor):
    """`_mlm` with shapes that do not depend on the labels: logits (B, K, V) at the first
    K = `model.max_predictions` labelled positions of each row (every position when None);
    a row with fewer has unlabelled ones among its K, which carry no loss. Labels past the
    K-th of a row are not predicted (a collate that masks at most K per row has none)."""
    B, T, H = last.shape
    K = T if model.max_predictions is None else min(T, model.max_predictions)
    if K < T:
        # Earlier labelled positions score higher; unlabelled ones score 0 and come last.
        score = (labels != IGNORE_INDEX) * torch.arange(T, 0, -1, device=labels.device)  # (B, T)
        positions = score.topk(K, dim=1).indices  # (B, K)
        last = last.gather(1, positions[..., None].expand(B, K, H))  # (B, K, H)
        labels = labels.gather(1, positions)  # (B, K)
    logits = model.mlm(last, tied)  # (B, K, V)
    count = (labels != IGNORE_INDEX).sum()  # ()
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum") / count.clamp_min(1)
    correct = (logits.detach().argmax(-1) == labels).sum()  # argmax is never -100
    return logits, loss, correct, count


class BertForPreTraining(_HeadModel):
    """BERT pretraining: masked LM + next-sentence (or sentence-order) prediction."""

    hf_architecture = "BertForPreTraining"
    hf_head_names = {"mlm.dense": "cls.predictions.transform.dense",
                     "mlm.norm": "cls.predictions.transform.LayerNorm",
                     "mlm.bias": "cls.predictions.bias", "nsp": "cls.seq_relationship"}
    # Compiled only: masked positions decoded per row (the collate's max_predictions);
    # None decodes every position. Eager mode decodes exactly the masked ones.
    max_predictions: int | None = None

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.mlm = MLMHead(config)
        self.mlm_loss = MaskedLMLoss()
        self.nsp = nn.Linear(config.hidden_size, 2)
        self._init_head()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None) -> PreTrainingOutput:
        """labels: (B, T) token ids at masked positions, -100 elsewhere; next_sentence_label:
        (B,) 0 = B follows A, 1 = random/swapped."""
        out = self.bert(input_ids, attention_mask, token_type_ids)
        logits, mlm_loss, mlm_correct, mlm_count = _mlm(self, out.last_hidden_state, labels)
        nsp_logits = self.nsp(out.pooler_output)  # (B, 2)
        nsp_loss = nsp_correct = None
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            nsp_correct = (nsp_logits.detach().argmax(-1) == next_sentence_label).sum()
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        return PreTrainingOutput(
            loss=sum(losses[1:], losses[0]) if losses else None, mlm_loss=mlm_loss,
            nsp_loss=nsp_loss, prediction_logits=logits, seq_relationship_logits=nsp_logits,
            mlm_correct=mlm_correct, mlm_count=mlm_count, nsp_correct=nsp_correct)


class BertForMaskedLM(_HeadModel):
    """Masked language model only (no pooler, as in transformers)."""

    hf_architecture = "BertForMaskedLM"
    hf_head_names = {"mlm.dense": "cls.predictions.transform.dense",
                     "mlm.norm": "cls.predictions.transform.LayerNorm",
                     "mlm.bias": "cls.predictions.bias"}
    max_predictions: int | None = None  # as BertForPreTraining's

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.mlm = MLMHead(config)
        self.mlm_loss = MaskedLMLoss()
        self._init_head()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> MaskedLMOutput:
        """labels: (B, T) token ids at masked positions, -100 elsewhere."""
        out = self.bert(input_ids, attention_mask, token_type_ids)
        logits, loss, correct, count = _mlm(self, out.last_hidden_state, labels)
        return MaskedLMOutput(loss=loss, logits=logits, mlm_correct=correct, mlm_count=count)


class BertForSequenceClassification(_HeadModel):
    """A label (or a score when num_labels == 1) per sentence or sentence pair. Pairs are
    `[CLS] A [SEP] B [SEP]` with token_type_ids 0/1.

    The sentence vector is `config.classifier_pooling`: the pooled [CLS] (BERT's
    fine-tuning), or token vectors averaged over real tokens (the frozen, feature-based use:
    a frozen encoder's [CLS] pooler was trained for NSP, not for your labels). Without cls
    pooling the model has no pooler, so DDP sees no parameter without a gradient.
    """

    hf_architecture = "BertForSequenceClassification"
    hf_head_names = {"classifier": "classifier"}

    def __init__(self, config: BertConfig):
        super().__init__(config)
        pooling = config.classifier_pooling
        self.bert = BertModel(config, add_pooling_layer=pooling == "cls")
        p = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        width = config.hidden_size * (4 if pooling == "mean_last4" else 1)
        self.classifier = nn.Linear(width, config.num_labels)
        self._init_head()

    def sentence_vector(self, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What the classifier reads: (B, H), or (B, 4H) for mean_last4."""
        pooling = self.config.classifier_pooling
        out = self.bert(input_ids, attention_mask, token_type_ids,
                        output_hidden_states=pooling == "mean_last4")
        if pooling == "cls":
            return out.pooler_output  # (B, H)
        tokens = (torch.cat(out.hidden_states[-4:], dim=-1) if pooling == "mean_last4"
                  else out.last_hidden_state)  # (B, T, W)
        if attention_mask is None:
            return tokens.mean(dim=1)  # (B, W)
        weight = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
        return (tokens * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (B, W)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ClassifierOutput:
        """labels: (B,) class ids, or (B,) float targets when num_labels == 1 (MSE)."""
        pooled = self.sentence_vector(input_ids, attention_mask, token_type_ids)  # (B, W)
        logits = self.classifier(self.dropout(pooled))  # (B, C)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return ClassifierOutput(loss=loss, logits=logits)


class BertForTokenClassification(_HeadModel):
    """A label per token (NER, POS); positions labelled -100 carry no loss."""

    hf_architecture = "BertForTokenClassification"
    hf_head_names = {"classifier": "classifier"}

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_head()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ClassifierOutput:
        """labels: (B, T) class ids, -100 on pads, specials and non-first sub-words."""
        last = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.classifier(self.dropout(last))  # (B, T, C)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return ClassifierOutput(loss=loss, logits=logits)


class BertForQuestionAnswering(_HeadModel):
    """Extractive QA: start and end logits of the answer span over the tokens."""

    hf_architecture = "BertForQuestionAnswering"
    hf_head_names = {"qa_outputs": "qa_outputs"}

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._init_head()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None) -> QuestionAnsweringOutput:
        """start_positions / end_positions: (B,) token indices of the answer span.

        Positions outside the sequence carry no loss (as in transformers). Pad positions get
        the lowest logit, so a span never starts or ends in padding (transformers leaves
        arbitrary values there).
        """
        last = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.qa_outputs(last)  # (B, T, 2)
        if attention_mask is not None:
            pad = attention_mask[..., None] == 0  # (B, T, 1)
            logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        start, end = logits.unbind(-1)  # 2 x (B, T)
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start.shape[1]
            # Clamp to T and ignore T: an answer truncated away gives no gradient.
            s = start_positions.reshape(-1).clamp(0, T)
            e = end_positions.reshape(-1).clamp(0, T)
            loss = (F.cross_entropy(start.float(), s, ignore_index=T)
                    + F.cross_entropy(end.float(), e, ignore_index=T)) / 2
        return QuestionAnsweringOutput(loss=loss, start_logits=start.contiguous(),
                                       end_logits=end.contiguous())
