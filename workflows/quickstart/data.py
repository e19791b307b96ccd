"""The quickstart's data, made offline: a real corpus (the Python language reference that
every CPython ships) and a small sentiment task generated so that its score is fair."""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path


def _sentences(paragraph: str) -> list[str]:
    # Heading underlines (*****, =====) are markup, not text.
    text = " ".join(line.strip() for line in paragraph.splitlines()
                    if line.strip() and not re.fullmatch(r"[*=~^-]+", line.strip()))
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", text) if len(s) > 1]


def write_reference_corpus(path: Path, sentences_per_doc: int = 24) -> dict[str, int]:
    """The Python language reference (pydoc_data.topics) in BERT's text format.

    Each topic is cut into documents of about `sentences_per_doc` sentences, so NSP has many
    documents to draw random next sentences from. Returns counts for the summary.
    """
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        sentences = [s for para in re.split(r"\n\s*\n", topics[key]) for s in _sentences(para)]
        for i in range(0, len(sentences), sentences_per_doc):
            chunk = sentences[i:i + sentences_per_doc]
            if len(chunk) >= 2:
                docs.append(chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    tmp.replace(path)  # never a half-written corpus
    return {"topics": len(topics), "documents": len(docs),
            "sentences": sum(len(d) for d in docs)}


PRODUCTS = ["kettle", "laptop", "phone", "pair of headphones", "coffee grinder", "backpack",
            "desk lamp", "blender", "keyboard", "monitor", "vacuum cleaner", "tent",
            "camera", "printer", "office chair", "toaster", "router", "smartwatch",
            "e-reader", "rice cooker", "electric toothbrush", "hair dryer", "speaker",
            "water bottle"]
POSITIVE = ["works perfectly", "is a joy to use", "exceeded my expectations",
            "is worth every penny", "feels sturdy and well made", "was easy to set up",
            "does exactly what it promises", "is fast and reliable", "made my mornings better",
            "has been flawless so far", "is the best purchase I made this year",
            "arrived early and works great"]
NEGATIVE = ["stopped working after a week", "is a waste of money", "broke on the first day",
            "feels cheap and flimsy", "was a nightmare to set up", "does not do what it promises",
            "is slow and unreliable", "made my mornings worse", "has been faulty from the start",
            "is the worst purchase I made this year", "arrived damaged and barely works",
            "overheats and smells of burnt plastic"]
OPENERS = ["", "Honestly, ", "After two weeks, ", "I have to say ", "To be fair, ",
           "My verdict: ", "In short, "]
CLOSERS = ["", " I would buy it again.", " Would not recommend.", " Five stars from me.",
           " Returning it tomorrow.", " My partner agrees.", " Customer service was polite."]


def write_review_task(folder: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    """A small sentiment task (`text,label` CSV, labels negative/positive).

    Evaluation reviews are about products never seen in training, and closers carry no
    reliable label signal, so the score measures the model reading the opinion.
    """
    rng = random.Random(seed)
    eval_products = set(PRODUCTS[::4])  # held out
    train_products = [p for p in PRODUCTS if p not in eval_products]

    def review(products: list[str]) -> tuple[str, str]:
        label = rng.choice(["positive", "negative"])
        opinion = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        opener = rng.choice(OPENERS)
        subject = f"{rng.choice(['the', 'this', 'my new'])} {rng.choice(products)}"
        text = f"{opener}{subject} {opinion}.{rng.choice(CLOSERS)}"
        return text[0].upper() + text[1:], label

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, products in (("train", n_train, train_products),
                               ("dev", n_eval, sorted(eval_products))):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(review(products) for _ in range(n))
        files[split] = path
    unseen = folder / "unseen.csv"
    with open(unseen, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"])
        writer.writerows([["The tent kept us dry all week and packs down small."],
                          ["This printer jams on every page and the ink costs a fortune."],
                          ["My new camera takes wonderful pictures even at night."],
                          ["The toaster burns one side and leaves the other cold."]])
    files["unseen"] = unseen
    return files
