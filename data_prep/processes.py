"""Prep's work on this machine's own processes, with no Ray: `PrepProcesses`, one spawned
process per core, runs the driver's tokenizing (`tokenize_documents` of each unit as it
closes) and then, on one machine, every item of the instance and merge passes
(`pipeline.run_tasks`).

Why processes, each with the tokenizer on one thread: the Hugging Face tokenizer's own
batch parallelism (its Rust threads) kept 1.56-1.67 of 2 cores busy and tokenized 100 MB
of text in 33.5-42.2 s; two processes each calling it on one thread tokenized the same
lines in 21.0-22.0 s (8,192 lines per call, in turns, on the 2-core machine). Why not a
private local Ray for the later passes: its start (GCS, raylet, workers importing) took
about 5 s of the 2 cores' CPU while the instance pass ran (1.71 cores busy on that pass
at 100 MB) and its processes held about 0.8 GB; these processes are already started and
warm from the tokenizing. The processes are started with `spawn` (never `fork`: the driver
may hold threads and the tokenizer's own thread pool), so a script calling
`build_pretraining_dataset` needs the usual `if __name__ == "__main__":` guard. Rows never
depend on which process runs an item.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

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


def _start_process(tokenizer: WordPieceTokenizer | None) -> None:
    # one thread per process: the processes are the parallelism (read by the tokenizer
    # when it is first called, so setting it here, before the first call, is enough)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _PROCESS_TOKENIZER[:] = [tokenizer] if tokenizer is not None else []


def _tokenize_in_process(docs_text: list[list[str]], index: int, staging: str
                         ) -> dict[str, Any]:
    return tokenize_documents(docs_text, index, _PROCESS_TOKENIZER[0], staging)


class ProcessDied(RuntimeError):
    """A prep process ended abruptly (killed, or out of memory): the pass fails."""


class PrepProcesses:
    """`processes` spawned processes, started with the first item submitted (a build
    that never needs them starts none), each with the tokenizer (when given) on one
    thread. `tokenize` sends a unit's text to a process, which writes its tokens;
    `submit` runs any picklable function there. Closing waits for the items in hand and
    drops those not started (the caller has either taken every result or failed)."""

    def __init__(self, processes: int, tokenizer: WordPieceTokenizer | None = None) -> None:
        self.processes, self.tokenizer = processes, tokenizer
        self._pool: ProcessPoolExecutor | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_process, initargs=(self.tokenizer,))
        return self._pool.submit(fn, *args)

    def tokenize(self, docs_text: list[list[str]], index: int, staging: str) -> Future:
        if self.tokenizer is None:
            raise ValueError("these processes were started without a tokenizer")
        return self.submit(_tokenize_in_process, docs_text, index, staging)

    @staticmethod
    def result(future: Future) -> Any:
        """The item's result, its own error, or `ProcessDied` naming what to check."""
        try:
            return future.result()
        except BrokenProcessPool as err:
            raise ProcessDied(
                "a prep process ended abruptly (killed, or out of memory: see the kernel "
                "log); rerun, with fewer --tokenize-workers or a smaller --docs-per-unit if "
                "memory is short") from err

    def __enter__(self) -> PrepProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
