"""The tokenized corpus on disk, and random access to any of its documents.

Prep's first pass writes each work unit's documents, tokenized, to one binary file:

    header   int64[4]        magic, documents, sentences, tokens
    docs     int64[D + 1]    document d holds sentences docs[d] .. docs[d + 1]
    sents    int64[S + 1]    sentence s holds tokens sents[s] .. sents[s + 1]
    tokens   int32[N]

`SplitPool` numbers every document of a split across all units (unit order, then the
order inside the unit: the order the driver read them) and fetches the sentences of any
document with a few positioned reads. NSP's "random next" segments come from it, so they
are drawn from the whole split while a worker holds only its own unit in memory: the
pool keeps one small array per unit, and the document bounds of the units it keeps open
(8 bytes a document); sentence bounds and tokens stay in the files, whose pages live in
the OS cache, not in the workers' memory.

Unit files may live on any `pyarrow.fs` filesystem (a prep whose output is `s3://...`
stages them beside the output, so a worker on any node reads them). The pool reads them
on an object store through `storage.BlockCache`: positioned reads in 1 MiB blocks (one
ranged GET each, an LRU of 64 MiB per pool), so NSP's random segment fetches share GETs
instead of costing one each. Local unit files are read with `os.pread` (the OS caches
their pages).
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_prep.storage import BlockCache, open_location

_MAGIC = 0x42455254464C4F57  # "BERTFLOW"
_HEADER = 4 * 8

Document = list[list[int]]


def write_tokenized(path: str | Path, documents: list[Document]) -> dict[str, int]:
    """Write documents (lists of sentences of ids) in the unit file format above; `path`
    may be a URI."""
    sent_lengths = [len(s) for doc in documents for s in doc]
    docs = np.zeros(len(documents) + 1, np.int64)
    np.cumsum([len(d) for d in documents], out=docs[1:])
    sents = np.zeros(len(sent_lengths) + 1, np.int64)
    np.cumsum(sent_lengths, out=sents[1:])
    tokens = np.fromiter(chain.from_iterable(chain.from_iterable(documents)), np.int32,
                         count=int(sents[-1]))
    header = np.array([_MAGIC, len(documents), len(sent_lengths), tokens.shape[0]], np.int64)
    with open_location(path).open_output_stream() as fh:
        for array in (header, docs, sents, tokens):
            fh.write(array.tobytes())
    return {"documents": len(documents), "sentences": len(sent_lengths),
            "tokens": int(tokens.shape[0])}


def read_tokenized_arrays(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A unit file's arrays as they are stored: (docs, sents, tokens) (format above)."""
    raw = open_location(path).read_bytes()
    header = np.frombuffer(raw, np.int64, 4)
    if header[0] != _MAGIC:
        raise ValueError(f"{path}: not a bertflow tokenized unit")
    n_docs, n_sents, n_tokens = (int(x) for x in header[1:])
    docs = np.frombuffer(raw, np.int64, n_docs + 1, offset=_HEADER)
    sents = np.frombuffer(raw, np.int64, n_sents + 1, offset=_HEADER + 8 * (n_docs + 1))
    tokens = np.frombuffer(raw, np.int32, n_tokens,
                           offset=_HEADER + 8 * (n_docs + n_sents + 2))
    return docs, sents, tokens


def read_tokenized(path: str | Path) -> list[Document]:
    """All documents of a unit file, as lists of sentences of ids (what the recipe eats)."""
    docs, sents, array = read_tokenized_arrays(path)
    tokens = array.tolist()
    bounds = sents.tolist()
    sentences = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [sentences[a:b] for a, b in zip(docs[:-1].tolist(), docs[1:].tolist())]


class DocumentPool(Protocol):
    """What NSP's random-next draw needs: how many documents, and a document's text."""

    def __len__(self) -> int: ...

    def num_sentences(self, index: int) -> int: ...

    def segment_from(self, index: int, start: int, min_tokens: int) -> np.ndarray:
        """Sentences start, start+1, ... of document `index`, joined (int32), stopping at
        the first sentence that brings the count to `min_tokens` (or at the document's
        end)."""
        ...


class ListPool:
    """A DocumentPool over documents in memory (tests, small corpora)."""

    def __init__(self, documents: list[Document]) -> None:
        self.documents = documents

    def __len__(self) -> int:
        return len(self.documents)

    def num_sentences(self, index: int) -> int:
        return len(self.documents[index])

    def segment_from(self, index: int, start: int, min_tokens: int) -> np.ndarray:
        out: list[int] = []
        for sentence in self.documents[index][start:]:
            out.extend(sentence)
            if len(out) >= min_tokens:
                break
        return np.array(out, np.int32)


def _local_max_open() -> int:
    """Local unit files one pool keeps open: a quarter of the soft descriptor limit
    (Ray and the process keep the rest), at least 64."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, min(4096, soft // 4))


class _LocalReader:
    """`read_at` on a local file by `os.pread` (the OS page cache is the block cache)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read_at(self, nbytes: int, offset: int) -> bytes:
        return os.pread(self.fd, nbytes, offset)

    def close(self) -> None:
        os.close(self.fd)


class SplitPool:
    """Every document of one split, across all unit files, fetched by positioned reads.

    `units` lists (path or URI, documents) in split order; document g lives in the unit
    whose range of global numbers holds g. Open files are kept in an LRU, each with its
    document bounds: on an object store 64 of them (each with its block cache); local
    files hold only a descriptor, so up to a quarter of the process's descriptor limit
    stay open (reopening a unit costs more than the draw itself: at 1,313 units, an LRU
    of 64 doubled the time per draw)."""

    def __init__(self, units: list[tuple[str, int]], max_open: int | None = None,
                 cache_bytes: int | None = None) -> None:
        self.paths = [str(p) for p, _ in units]
        self.starts = np.zeros(len(units) + 1, np.int64)
        np.cumsum([n for _, n in units], out=self.starts[1:])
        self._starts = self.starts.tolist()  # bisect on a list: no numpy call per draw
        self._size = self._starts[-1]
        self._files: OrderedDict[int, tuple[Any, np.ndarray, int]] = OrderedDict()
        if max_open is None:
            local = not self.paths or open_location(self.paths[0]).local
            max_open = _local_max_open() if local else 64
        self._max_open = max_open
        self._cache_bytes = cache_bytes
        self._last: tuple[int, Any] = (-1, None)  # the last document looked up

    @classmethod
    def load(cls, path: str | Path) -> SplitPool:
        """A pool described by the JSON list of [path, documents] the driver writes."""
        return cls([(p, int(n)) for p, n in json.loads(open_location(path).read_text())])

    def __len__(self) -> int:
        return self._size

    def close(self) -> None:
        self._last = (-1, None)
        while self._files:
            self._files.popitem()[1][0].close()

    def _open(self, path: str) -> BlockCache | _LocalReader:
        loc = open_location(path)
        if loc.local:  # the OS caches pages: plain positioned reads are the fastest
            return _LocalReader(loc.path)
        # one ranged GET per block: large blocks, shared by neighbouring reads
        block, budget = 1 << 20, self._cache_bytes or 64 << 20
        per_file = max(2, budget // block // max(1, min(self._max_open, len(self.paths))))
        file = loc.open_input_file()
        return BlockCache(file, file.size(), block_size=block, max_blocks=per_file)

    def _unit(self, index: int) -> tuple[Any, np.ndarray, int, int]:
        """(file, its document bounds, local document index, sentences) of global
        document `index`. A unit's header and document bounds (8 bytes a document) are
        read in one go when it is opened and kept while it stays open: a draw then costs
        two positioned reads, not four (each is a system call, which a sandboxed host
        makes expensive)."""
        if self._last[0] == index:  # a draw asks for its document's sentences, then them
            return self._last[1]
        if not 0 <= index < self._size:
            raise IndexError(f"document {index} is outside the pool of {len(self)}")
        u = bisect_right(self._starts, index) - 1
        entry = self._files.get(u)
        if entry is None:
            file = self._open(self.paths[u])
            n_docs = int(self.starts[u + 1] - self.starts[u])
            head = np.frombuffer(file.read_at(_HEADER + 8 * (n_docs + 1), 0), np.int64)
            if head[0] != _MAGIC or head[1] != n_docs:
                raise ValueError(f"{self.paths[u]}: not the tokenized unit of {n_docs} "
                                 "documents the pool lists")
            entry = self._files[u] = (file, head[4:], int(head[2]))
            if len(self._files) > self._max_open:
                self._files.popitem(last=False)[1][0].close()
                self._last = (-1, None)
        else:
            self._files.move_to_end(u)
        file, docs, n_sents = entry
        found = file, docs, index - self._starts[u], n_sents
        self._last = (index, found)
        return found

    def num_sentences(self, index: int) -> int:
        _, docs, local, _ = self._unit(index)
        return int(docs[local + 1] - docs[local])

    def segment_from(self, index: int, start: int, min_tokens: int) -> np.ndarray:
        file, docs, local, n_sents = self._unit(index)
        first, s1 = int(docs[local]) + start, int(docs[local + 1])
        if first >= s1:
            return np.zeros(0, np.int32)
        sents_at = _HEADER + 8 * docs.shape[0]
        bounds = np.frombuffer(file.read_at(8 * (s1 - first + 1), sents_at + 8 * first),
                               np.int64).tolist()
        # the first sentence whose end reaches min_tokens closes the segment
        end = bounds[min(bisect_left(bounds, bounds[0] + min_tokens, 1), len(bounds) - 1)]
        tokens_at = sents_at + 8 * (n_sents + 1)
        raw = file.read_at(4 * (end - bounds[0]), tokens_at + 4 * bounds[0])
        return np.frombuffer(raw, np.int32)
