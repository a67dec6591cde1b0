"""The seed's walkthrough, run through a real model, cache and attention: masks, seqlens and ring slots."""

import torch

from hf_rolling_cache.tools.walkthrough import run_walkthrough
from tests.conftest import SEED_DECODE_1, SEED_ITERATION_1, SEED_ITERATION_2, layer0_key


def test_seed_walkthrough_golden():
    steps, cache = run_walkthrough([4, 1, 3], window=3, chunk=2, new_tokens=5)
    assert [s.name for s in steps] == ["iteration 1", "iteration 2"] + [f"decode {i}" for i in range(1, 6)]
    first, second, decode = steps[0], steps[1], steps[2]

    assert (first.phase, first.q_seqlens, first.kv_seqlens) == ("prefill", (2, 1, 2), (2, 1, 2))
    assert first.mask == SEED_ITERATION_1
    assert first.slot_positions == [[0, 1, -1], [0, -1, -1], [0, 1, -1]]

    assert (second.phase, second.q_seqlens, second.kv_seqlens) == ("subsequent_prefill", (2, 0, 1), (4, 1, 3))
    assert second.mask == SEED_ITERATION_2
    # positions 2, 3 of the first sequence land in slots 2 and 0: rolling positions [0, 1, 2, 0, ...]
    assert second.slot_positions == [[3, 1, 2], [0, -1, -1], [0, 1, 2]]

    assert (decode.phase, decode.q_seqlens, decode.kv_seqlens) == ("decode", (1, 1, 1), (3, 2, 3))
    assert decode.mask == SEED_DECODE_1
    assert decode.slot_positions == [[3, 4, 2], [0, 1, -1], [3, 1, 2]]  # new tokens #4, #1, #3

    for step in steps[3:]:
        assert step.phase == "decode" and step.kv_seqlens == (3, 3, 3)
    assert [len(t) for t in steps[-1].tokens] == [9, 6, 8]
    assert cache.seen == [9, 6, 8]


def test_walkthrough_ring_holds_the_keys_of_those_positions():
    from hf_rolling_cache.tools.walkthrough import tiny_model

    model = tiny_model(3)
    steps, cache = run_walkthrough([4, 1, 3], window=3, chunk=2, new_tokens=5, model=model)
    ring = cache.layers[0].slot_keys
    for row, (positions, tokens) in enumerate(zip(steps[-1].slot_positions, steps[-1].tokens)):
        for slot, position in enumerate(positions):
            torch.testing.assert_close(ring[row, slot], layer0_key(model, tokens[position], position))
