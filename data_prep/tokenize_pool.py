"""Pass 1 in the driver: one unit's documents tokenized and written as `tokens-INDEX.bin`,
in this process or in a pool of tokenizing processes.

The Hugging Face tokenizer's own batch parallelism (its Rust threads) kept 1.56-1.67 of 2
cores busy and tokenized 100 MB of text in 33.5-42.2 s; two processes each calling it on
one thread tokenized the same lines in 21.0-22.0 s (8,192 lines per call, in turns, on the
2-core machine). So the driver hands whole units to `TokenizerPool`: one process per core,
each with the tokenizer on one thread, started with `spawn` (never `fork`: the driver
may hold threads and the tokenizer's own thread pool) and importing only this module's
few dependencies. Token ids never depend on which process tokenizes a unit.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from data_prep.corpus import write_tokenized
from data_prep.storage import open_location
from data_prep.tokenizer import WordPieceTokenizer


def tokenize_documents(docs_text: list[list[str]], index: int,
                       tokenizer: WordPieceTokenizer, staging: str | Path) -> dict[str, Any]:
    """Pass 1 of one unit: its documents tokenized and written in the `corpus` format as
    `tokens-INDEX.bin`. Sentences without tokens are dropped, documents without any are
    counted (no_tokens)."""
    started = time.perf_counter()
    ids = tokenizer.encode_batch([s for doc in docs_text for s in doc])
    documents, k, no_tokens = [], 0, 0
    for doc in docs_text:
        sents = [s for s in ids[k:k + len(doc)] if s]
        k += len(doc)
        if sents:
            documents.append(sents)
        else:
            no_tokens += 1
    path = open_location(staging).join(f"tokens-{index:06d}.bin").uri
    sizes = write_tokenized(path, documents)
    return {"index": index, "tokens_path": path, "documents_used": sizes["documents"],
            "skipped.no_tokens": no_tokens, "sentences": sizes["sentences"],
            "corpus_tokens": sizes["tokens"], "seconds": time.perf_counter() - started}


_PROCESS_TOKENIZER: list[WordPieceTokenizer] = []  # a pool process's tokenizer


def _start_process(tokenizer: WordPieceTokenizer) -> None:
    # one thread per process: the pool is the parallelism (read by the tokenizer when it
    # is called, so setting it here, before the first call, is enough)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _PROCESS_TOKENIZER[:] = [tokenizer]


def _tokenize_in_process(docs_text: list[list[str]], index: int, staging: str
                         ) -> dict[str, Any]:
    return tokenize_documents(docs_text, index, _PROCESS_TOKENIZER[0], staging)


class TokenizerPool:
    """`tokenize_documents` of whole units on `processes` spawned processes (started with
    the first unit), each with the tokenizer on one thread; a unit's text is sent to its
    process, its result comes back (the tokens are written by the process). Closing it
    waits for the units in hand and drops those not started (the caller has either
    taken every result or failed)."""

    def __init__(self, tokenizer: WordPieceTokenizer, staging: str, processes: int) -> None:
        self.tokenizer, self.staging, self.processes = tokenizer, staging, processes
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, docs_text: list[list[str]], index: int) -> Future:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_process, initargs=(self.tokenizer,))
        return self._pool.submit(_tokenize_in_process, docs_text, index, self.staging)

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
