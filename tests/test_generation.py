"""Generation parity with Transformers' own path: eager attention and its default cache, same weights."""

import functools

import pytest
import torch

from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, ragged_batch, tiny_config

WINDOWS = [3, 4, 8, 16]


def prompt_sets(window):
    return {
        "seed": [4, 1, 3],
        "ragged": [37, 2, 19, 64],
        "equal": [window, window],
        "shorter": [window - 1, 1],
    }


def chunk_sizes(window):
    return {"none": None, "below": max(1, window - 1), "equal": window, "above": window + 3}


@functools.lru_cache(maxsize=None)
def models(window):
    return model_pair(tiny_config(window, kv_heads=1 if window in (3, 8) else 2), seed=window)


@functools.lru_cache(maxsize=None)
def reference_run(window, prompts):
    reference, _ = models(window)
    input_ids, attention_mask = ragged_batch(list(prompts), seed=len(prompts))
    return reference.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=3 * window + 2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )


@pytest.mark.parametrize("chunk", ["none", "below", "equal", "above"])
@pytest.mark.parametrize("prompts", ["seed", "ragged", "equal", "shorter"])
@pytest.mark.parametrize("window", WINDOWS)
def test_greedy_parity(window, prompts, chunk):
    lengths = prompt_sets(window)[prompts]
    expected = reference_run(window, tuple(lengths))
    _, rolling = models(window)
    input_ids, attention_mask = ragged_batch(lengths, seed=len(lengths))
    cache = RollingSlidingWindowCache(config=rolling.config)
    got = rolling.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        prefill_chunk_size=chunk_sizes(window)[chunk],
        max_new_tokens=3 * window + 2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 3 * window + 2
    for step, (ours, theirs) in enumerate(zip(got.scores, expected.scores)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4, msg=f"step {step}")
    assert cache.memory_bytes() == 2 * 2 * len(lengths) * window * cache.layers[0].slot_keys.shape[2] * 16 * 4


@pytest.mark.parametrize("window,chunk", [(4, None), (8, 5)])
def test_seeded_sampling_parity(window, chunk):
    reference, rolling = models(window)
    lengths = [37, 2, 19, 64]
    input_ids, attention_mask = ragged_batch(lengths, seed=7)
    options = dict(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3 * window, do_sample=True,
        temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0,
    )
    torch.manual_seed(1234)
    expected = reference.generate(**options)
    torch.manual_seed(1234)
    got = rolling.generate(
        **options, past_key_values=RollingSlidingWindowCache(config=rolling.config), prefill_chunk_size=chunk
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("window,prompts,chunk", [(4, "ragged", None), (3, "seed", 1), (8, "ragged", 1), (16, "equal", 5)])
def test_decode_planned_on_the_device_matches(window, prompts, chunk):
    """The decode plan a CUDA graph replays (device counters, padded rows masked in place) gives the same
    tokens and logits; chunk 1 sends decode-shaped prefill steps with padding through it."""
    lengths = prompt_sets(window)[prompts]
    expected = reference_run(window, tuple(lengths))
    _, rolling = models(window)
    input_ids, attention_mask = ragged_batch(lengths, seed=len(lengths))
    cache = RollingSlidingWindowCache(config=rolling.config)
    cache.decode_on_device = True
    got = rolling.generate(
        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, prefill_chunk_size=chunk,
        max_new_tokens=3 * window + 2, do_sample=False, output_scores=True, return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert type(cache.last_plan).__name__ == "DeviceDecodePlan"
    assert cache.seen == [n + 3 * window + 1 for n in lengths]  # the host list catches up from the device


@pytest.mark.parametrize("lengths,full", [((9, 6, 12), True), ((9, 2, 12), False)])
def test_device_planned_decode_drops_the_key_mask_once_every_ring_is_full(lengths, full):
    """When the host knows every row holds a whole window, a decode step attends over every slot with no key mask
    (what a CUDA graph captured then replays); a row still filling its ring keeps the mask. Same answer either way."""
    window = 4
    expected = reference_run(window, lengths)
    _, rolling = models(window)
    input_ids, attention_mask = ragged_batch(list(lengths), seed=len(lengths))
    cache = RollingSlidingWindowCache(config=rolling.config)
    cache.decode_on_device = True
    got = rolling.generate(
        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=3 * window + 2,
        do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    plan = cache.last_plan
    assert type(plan).__name__ == "DeviceDecodePlan" and plan.full is full
    assert (plan.key_padding(torch.device("cpu")) is None) is full
