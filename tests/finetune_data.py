"""Small but meaningful fine-tuning data, built in the tests without network.

Each builder writes files in the formats users bring (CSV/JSONL, CoNLL, SQuAD JSON) with
labels that follow from the text (not random), so a model that learns beats the
majority-class / trivial baseline, and one that does not, does not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["wonderful", "great", "delightful", "brilliant", "superb", "lovely", "excellent",
            "moving", "charming", "fantastic"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "dull", "horrible", "painful",
            "tedious", "disappointing", "poor"]
NOUNS = ["film", "movie", "story", "acting", "plot", "ending", "soundtrack", "script",
         "cast", "show", "performance", "direction"]
SENTIMENT = ["the {n} was {a} .", "i thought the {n} was really {a}", "what a {a} {n} !",
             "honestly , a {a} {n} from start to finish", "my friends found the {n} {a}"]
FIRST = ["Anna", "Pierre", "Maria", "John", "Yuki", "Omar", "Lena", "Carlos", "Priya", "Tom",
         "Sofia", "Ivan", "Grace", "Ahmed", "Elena", "Lucas"]
LAST = ["Schmidt", "Dubois", "Rossi", "Smith", "Tanaka", "Haddad", "Novak", "Garcia",
        "Sharma", "Brown", "Costa", "Petrov"]
CITIES = ["Paris", "Berlin", "Tokyo", "Lisbon", "Cairo", "Madrid", "Oslo", "Lima", "New York",
          "Buenos Aires", "Hong Kong", "Cape Town", "Rome", "Vienna", "Seoul", "Dublin"]
NER = ["{P} moved to {L} last year .", "yesterday {P} flew from {L} to {L2} .",
       "{P} was born in {L} .", "the company hired {P} in {L} .",
       "in {L} , {P} met {P2} .", "{P} and {P2} live near {L} ."]


def write_sentiment(path: Path, n: int, seed: int, fmt: str = "csv") -> None:
    """`text,label` rows (pos/neg) from templated reviews; about 60% positive, so the
    majority-class baseline is about 0.6."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = "pos" if rng.random() < 0.6 else "neg"
        adj = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        rows.append({"text": rng.choice(SENTIMENT).format(n=rng.choice(NOUNS), a=adj),
                     "label": label})
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, ["text", "label"])
            w.writeheader()
            w.writerows(rows)


def write_scores(path: Path, n: int, seed: int, pair: bool = False) -> None:
    """Regression JSONL (STS-B-like numbers): a review scored 0-5 by its adjective (the
    positive ones 3.5-4.4, the negative 0.5-1.4), `text,label`; with `pair`, `text_a,
    text_b,label` with the second review's score."""
    rng = random.Random(seed)
    scale = {a: 3.5 + i / 10 for i, a in enumerate(POSITIVE)}
    scale.update({a: 0.5 + i / 10 for i, a in enumerate(NEGATIVE)})

    def review() -> tuple[str, float]:
        adj = rng.choice(POSITIVE + NEGATIVE)
        return rng.choice(SENTIMENT).format(n=rng.choice(NOUNS), a=adj), scale[adj]

    rows = []
    for _ in range(n):
        text, score = review()
        if pair:
            other, score = review()
            rows.append({"text_a": text, "text_b": other, "label": score})
        else:
            rows.append({"text": text, "label": score})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def write_pairs(path: Path, n: int, seed: int) -> None:
    """Paraphrase-style (MRPC/QQP-like) `text_a,text_b,label` JSONL: the second sentence
    restates the first in other words (paraphrase) or tells about another person in
    another city (different), half and half."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        p, city = _person(rng), rng.choice(CITIES)
        premise = rng.choice(["{p} lives in {c} with a cat .", "{p} has an office in {c} .",
                              "{p} grew up in {c} ."]).format(p=p, c=city)
        label = rng.choice(["paraphrase", "different"])
        if label == "different":
            p = rng.choice([q for q in FIRST if q != p.split()[0]])
            city = rng.choice([c for c in CITIES if c != city])
        hyp = rng.choice(["{p} is connected to {c} .", "{c} is a city {p} knows well .",
                          "{p} has spent years in {c} ."]).format(p=p.split()[0], c=city)
        lines.append(json.dumps({"text_a": premise, "text_b": hyp, "label": label}))
    path.write_text("\n".join(lines) + "\n")


def write_conll(path: Path, n: int, seed: int) -> None:
    """CoNLL sentences with PER and LOC entities (multi-word names and cities, BIO tags)."""
    rng = random.Random(seed)
    out = ["-DOCSTART- -X- O O", ""]
    for _ in range(n):
        template = rng.choice(NER).split()
        for tok in template:
            if tok in ("{P}", "{P2}"):
                words, kind = _person(rng).split(), "PER"
            elif tok in ("{L}", "{L2}"):
                words, kind = rng.choice(CITIES).split(), "LOC"
            else:
                words, kind = [tok], None
            for i, w in enumerate(words):
                tag = "O" if kind is None else ("B-" if i == 0 else "I-") + kind
                out.append(f"{w} X _ {tag}")
        out.append("")
    path.write_text("\n".join(out) + "\n")


JOBS = ["teacher", "pilot", "doctor", "painter", "chef", "lawyer", "farmer", "nurse"]
FILLER = ["The weather there is mild most of the year.", "It rained a lot that spring.",
          "The town has an old library.", "Many tourists visit in summer."]


def write_squad(path: Path, n_paragraphs: int, seed: int, v2: bool = False) -> None:
    """SQuAD JSON: a paragraph per person (birthplace, birth year, job, with filler
    sentences between), questions whose answers are spans of it; with v2, also a question
    the paragraph cannot answer (when the person died: never mentioned)."""
    rng = random.Random(seed)
    data, qid = [], 0
    for _ in range(n_paragraphs):
        p, c, y, job = _person(rng), rng.choice(CITIES), str(rng.randint(1900, 2020)), rng.choice(JOBS)
        parts = [f"{p} was born in {c} in {y}.", rng.choice(FILLER), f"{p} works as a {job}."]
        context = " ".join(parts)
        first = p.split()[0]
        spans = [(f"Where was {first} born?", c, context.index(f" in {c} in ") + 4),
                 (f"In which year was {first} born?", y, context.index(f" in {y}.") + 4),
                 (f"What does {first} do for a living?", job, context.index(f"a {job}.") + 2)]
        qas = []
        for question, ans, start in spans:
            assert context[start:start + len(ans)] == ans
            qas.append({"id": f"q{qid}", "question": question,
                        "answers": [{"text": ans, "answer_start": start}]})
            qid += 1
        if v2:
            qas.append({"id": f"q{qid}", "question": f"When did {first} die?",
                        "answers": [], "is_impossible": True})
            qid += 1
        data.append({"title": f"t{len(data)}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0" if v2 else "1.1", "data": data}, indent=1))


def write_tiny_base(dest: Path, vocab_from: Path) -> Path:
    """A tiny random BERT base folder (1 layer, no dropout: a run is a function of its
    data order) with MiniLM's tokenizer: fine-tuning from it takes seconds."""
    import torch

    from bert_core import BertConfig, BertModel
    from workflows.model_folder import save_model_folder

    torch.manual_seed(0)
    config = BertConfig.preset("tiny", vocab_size=30522, num_hidden_layers=1,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return save_model_folder(BertModel(config), dest, vocab_from, {})


def task_table(path: Path, task: str, tokenizer, **spec):
    """(feature table, records, labels) of a task file, as `bertflow finetune` tokenizes
    it (data_prep.tasks), without Ray."""
    import pyarrow as pa

    from data_prep.tasks.pipeline import Featurizer, TaskFeatures, label_list, read_task_file

    records, _ = read_task_file(path, task)
    for i, r in enumerate(records):
        r["example_index"] = i
    labels = label_list(records, task)
    table = Featurizer(tokenizer, TaskFeatures(task, **spec), labels)(pa.Table.from_pylist(records))
    return table, records, labels


def finetune_config(tmp: Path, minilm_dir: Path, task: str, train: Path, eval_: Path, **kw):
    """A FinetuneConfig for the tests: MiniLM (or `minilm_dir`) as base, a sqlite store,
    runs and data under `tmp`, 2 short epochs on one worker; `kw` overrides."""
    from workflows.config import FinetuneConfig, config_from_mapping

    settings = dict(task=task, base=str(minilm_dir), train=str(train), eval=str(eval_),
                    epochs=2, max_seq_len=48, batch_size=16, lr=5e-5,
                    tracking_uri=f"sqlite:///{tmp / 'mlruns.db'}", storage_path=str(tmp / "runs"),
                    data_dir=str(tmp / "data"), log_system_metrics=False, cpus_per_worker=1.0,
                    log_every=5)
    settings.update(kw)
    return config_from_mapping(FinetuneConfig, settings)
