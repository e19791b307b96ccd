"""The random generator of each document of a prep build.

Every document's pairs, masks and shuffle keys come from its own generator, seeded by
(seed, split, the document's number in the split), so rows do not depend on workers or
units. `doc_rng` builds one as numpy does (`Generator(PCG64(SeedSequence([...])))`);
`DocGenerators` gives the same generators for a run of documents at about a fifth of
the cost (numpy's SeedSequence hashes its entropy in Python, 14 us a document, a tenth
of a document's whole instance work): the hash vectorised over the run, PCG64's seeding
in Python integers, and the Generator objects reused once the caller is done with them
(a new PCG64 costs as much as the hash, since it draws OS entropy first). A test checks
it against `doc_rng` state for state.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val")

# numpy's SeedSequence (bit_generator.pyx): its hash constants and pool of 4 words
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_POOL = 4
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645  # PCG64's 128-bit multiplier
_MASK32, _MASK128 = (1 << 32) - 1, (1 << 128) - 1


def doc_rng(seed: int, split: str, document: int) -> np.random.Generator:
    """The generator of one document: its pairs, masks and shuffle keys depend only on
    (seed, split, the document's number in the split), not on workers or units."""
    # what default_rng([...]) builds, without its argument checks (a third of its cost)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, SPLITS.index(split), document])))


def seed_sequence_states(words: np.ndarray) -> np.ndarray:
    """`SeedSequence(row).generate_state(4, np.uint64)` for every row of `words`
    ((n, k) uint32, k <= 4: each row the entropy words SeedSequence would make of a list
    of k integers under 2**32), vectorised over the rows: (n, 4) uint64."""
    n, k = words.shape
    u32 = np.uint32
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ u32(hash_const)
        hash_const = (hash_const * _MULT_A) & _MASK32
        value = value * u32(hash_const)
        return value ^ (value >> u32(_XSHIFT))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = u32(_MIX_MULT_L) * x - u32(_MIX_MULT_R) * y
        return result ^ (result >> u32(_XSHIFT))

    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as in numpy's C code
        pool = [hashmix(words[:, i] if i < k else np.zeros(n, u32)) for i in range(_POOL)]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        hash_b = _INIT_B
        state = np.empty((n, 8), u32)
        for i in range(8):
            value = pool[i % _POOL] ^ u32(hash_b)
            hash_b = (hash_b * _MULT_B) & _MASK32
            value = value * u32(hash_b)
            state[:, i] = value ^ (value >> u32(_XSHIFT))
    return state.view("<u8")  # two words per uint64, low word first, as numpy views them


def _pcg64_state(val: list[int]) -> dict:
    # PCG64(seed_sequence): pcg64_set_seed with seed = val[0:2], inc = val[2:4]
    initstate, initseq = (val[0] << 64) | val[1], (val[2] << 64) | val[3]
    inc = ((initseq << 1) | 1) & _MASK128
    state = (((inc + initstate) & _MASK128) * _PCG_MULT + inc) & _MASK128
    return {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
            "has_uint32": 0, "uinteger": 0}


class DocGenerators:
    """`doc_rng(seed, split, d)` for documents first, first + 1, ... of one split, in
    order (`next()`), each a Generator in exactly that state; `give_back` returns
    generators the caller no longer uses, to be reseeded for later documents (by any
    DocGenerators of this process: the spares are shared, so a worker builds a
    Generator object only for the most documents it ever holds at once)."""

    _spare: list[np.random.Generator] = []

    def __init__(self, seed: int, split: str, first: int, count: int) -> None:
        self.seed, self.split, self.next_doc = seed, split, first
        if count and 0 <= seed <= _MASK32 and 0 <= first and first + count - 1 <= _MASK32:
            words = np.empty((count, 3), np.uint32)
            words[:, 0], words[:, 1] = seed, SPLITS.index(split)
            words[:, 2] = np.arange(first, first + count)
            self._states: list[list[int]] | None = seed_sequence_states(words).tolist()
        else:  # entropy words SeedSequence would split in two: numpy's own way
            self._states = None
        self._first = first

    def next(self) -> np.random.Generator:
        d = self.next_doc
        self.next_doc += 1
        if self._states is None:
            return doc_rng(self.seed, self.split, d)
        state = _pcg64_state(self._states[d - self._first])
        rng = self._spare.pop() if self._spare else np.random.Generator(np.random.PCG64(0))
        rng.bit_generator.state = state
        return rng

    def give_back(self, rngs: list[np.random.Generator]) -> None:
        self._spare.extend(rngs)
