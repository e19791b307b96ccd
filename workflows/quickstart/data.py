"""The quickstart's pretraining corpus, made offline: the Python language reference that
every CPython ships, in BERT's text format. The fine-tuning task built from the same text
is `pydoc_task`."""

from __future__ import annotations

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
