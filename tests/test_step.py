"""The step ledger's bookkeeping for captured decode steps, on CPU: a step captured in segments (a model split over
GPUs) leaves the counters to the replay, which advances them after its last segment; the host knows when every
ring is full without a sync."""

import torch

from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, ragged_batch, tiny_config

WINDOW = 4


def prefilled(lengths):
    _, model = model_pair(tiny_config(WINDOW))
    input_ids, attention_mask = ragged_batch(lengths)
    cache = RollingSlidingWindowCache(config=model.config)
    cache.decode_on_device = True
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    return model, cache, attention_mask


@torch.no_grad()
def test_a_deferred_step_leaves_the_counters_to_its_replay():
    model, cache, attention_mask = prefilled([6, 3])
    ledger = cache.ledger
    token = torch.ones(2, 1, dtype=torch.long)
    step_mask = torch.cat([attention_mask, torch.tensor([[1], [0]])], dim=1)  # the second row pads this column
    ledger.defer_advance = True
    try:
        with ledger.discarding():  # as a capture runs the step: nothing counted
            model(input_ids=token, attention_mask=step_mask, past_key_values=cache)
    finally:
        ledger.defer_advance = False
    assert cache.seen == [6, 3] and cache.get_seq_length() == 6
    ledger.commit_replayed(advance=True)  # the replay of that step: its real flags, added after the last segment
    assert cache.seen == [7, 3] and cache.get_seq_length() == 7


def test_rings_full_only_when_every_row_holds_a_window_and_the_ring_has_no_slack():
    _, cache, _ = prefilled([6, 3])
    assert not cache.ledger.rings_full(WINDOW, WINDOW)  # the second row holds 3 of 4
    _, cache, _ = prefilled([6, 4])
    assert cache.ledger.rings_full(WINDOW, WINDOW)
    assert not cache.ledger.rings_full(WINDOW, WINDOW + 2)  # slack: slots outside the window
    assert not cache.ledger.rings_full(None, 64)  # a global layer
