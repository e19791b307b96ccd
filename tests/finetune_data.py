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


def write_squad(path: Path, n_paragraphs: int, seed: int, v2: bool = False) -> None:
    """SQuAD JSON: paragraphs of templated facts about people and cities, questions whose
    answers are in the paragraph (a city or a year); with v2, also questions about people
    who are not mentioned (unanswerable)."""
    rng = random.Random(seed)
    data, qid = [], 0
    for _ in range(n_paragraphs):
        people = rng.sample(FIRST, 3)
        facts = [(p, rng.choice(CITIES), str(rng.randint(1900, 2020))) for p in people]
        context = " ".join(f"{p} was born in {c} in {y}." for p, c, y in facts)
        qas = []
        for p, c, y in facts:
            for question, ans in ((f"Where was {p} born?", c), (f"In which year was {p} born?", y)):
                start = context.index(f"{p} was born in {c} in {y}") + \
                    (len(f"{p} was born in ") if ans == c else len(f"{p} was born in {c} in "))
                qas.append({"id": f"q{qid}", "question": question,
                            "answers": [{"text": ans, "answer_start": start}]})
                qid += 1
        if v2:
            absent = rng.choice([f for f in FIRST if f not in people])
            qas.append({"id": f"q{qid}", "question": f"Where was {absent} born?",
                        "answers": [], "is_impossible": True})
            qid += 1
        data.append({"title": f"t{len(data)}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0" if v2 else "1.1", "data": data}, indent=1))
