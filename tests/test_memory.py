"""`tools.memory.cache_bytes`: what a cache holds, measured, for the rolling cache and Transformers' own caches."""

import torch
from transformers import DynamicCache, StaticCache

from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache.tools.memory import cache_bytes
from tests.conftest import model_pair, ragged_batch, tiny_config

WINDOW, LENGTHS, NEW = 4, [7, 3], 5
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 kv heads x 16 dims x fp32, per token and sequence


def generate(model, cache):
    input_ids, attention_mask = ragged_batch(LENGTHS)
    model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=NEW,
                   do_sample=False, pad_token_id=0)
    return cache


def test_no_cache_holds_nothing():
    assert cache_bytes(None) == 0


def test_a_rolling_cache_counts_its_own_storage():
    _, rolling = model_pair(tiny_config(WINDOW))
    cache = generate(rolling, RollingSlidingWindowCache(config=rolling.config))
    assert cache_bytes(cache) == cache.memory_bytes() == len(LENGTHS) * WINDOW * TOKEN_BYTES


def test_a_dynamic_sliding_cache_counts_the_tensor_its_slice_keeps_alive():
    """Transformers' sliding layer shows W-1 tokens, a view of the W-token tensor of the last step."""
    reference, _ = model_pair(tiny_config(WINDOW))
    cache = generate(reference, DynamicCache(config=reference.config))
    assert all(layer.keys.shape[2] == WINDOW - 1 for layer in cache.layers)
    assert cache_bytes(cache) == len(LENGTHS) * WINDOW * TOKEN_BYTES


def test_a_static_cache_counts_what_it_allocated():
    config = tiny_config(WINDOW)
    config.sliding_window = None  # full attention: every layer holds max_cache_len tokens
    reference, _ = model_pair(config)
    cache = StaticCache(config=reference.config, max_cache_len=32)
    assert cache_bytes(cache) == 0  # allocated at the first forward
    generate(reference, cache)
    assert cache_bytes(cache) == len(LENGTHS) * 32 * TOKEN_BYTES


def test_views_of_one_storage_count_it_once():
    reference, _ = model_pair(tiny_config(WINDOW))
    cache = generate(reference, DynamicCache(config=reference.config))
    shared = torch.zeros(2, 2, 8, 16)
    for layer in cache.layers:
        layer.keys, layer.values = shared[:, :, :3], shared[:, :, 3:]
    assert cache_bytes(cache) == shared.numel() * 4
