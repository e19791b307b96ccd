"""Each document's generator: the fast path (`DocGenerators`) against numpy's own."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.seeds import DocGenerators, doc_rng, seed_sequence_states


def test_seed_sequence_states_equal_numpys_for_any_words():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 4):
        words = rng.integers(0, 2**32, (200, k), dtype=np.uint64).astype(np.uint32)
        words[:3, 0] = [0, 1, 2**32 - 1]  # the edges of a word
        got = seed_sequence_states(words)
        for row, state in zip(words.tolist(), got):
            expected = np.random.SeedSequence(row).generate_state(4, np.uint64)
            assert state.tolist() == expected.tolist(), row


@pytest.mark.parametrize("seed, split, first", [(12345, "train", 0), (0, "val", 7),
                                                 (2**32 - 1, "train", 2**32 - 40),
                                                 (2**40 + 3, "train", 5),    # numpy's path
                                                 (3, "val", 2**32 - 2)])     # crosses 2**32
def test_doc_generators_are_doc_rng_state_for_state(seed, split, first):
    gens = DocGenerators(seed, split, first, 40)
    held = []
    for d in range(first, first + 40):
        rng = gens.next()
        expected = doc_rng(seed, split, d)
        assert rng.bit_generator.state == expected.bit_generator.state
        # the draws the recipe makes, scalar and vector, come out the same
        assert rng.integers(1, 7) == expected.integers(1, 7)
        assert rng.random(5).tolist() == expected.random(5).tolist()
        held.append(rng)
        if len(held) == 8:  # reused generators are reseeded, not continued
            gens.give_back(held)
            held = []
    assert gens.next_doc == first + 40
