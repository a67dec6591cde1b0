"""Failure modes made visible: misuse raises before any state changes, an interrupted forward never leaks
half-written layers into an answer, long runs stay flat, two models keep their own windows."""

import threading

import pytest
import torch

from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, ragged_batch, tiny_config


def snapshot(cache):
    rings = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers if layer.is_initialized]
    return cache.seen, cache.get_seq_length(), rings


def assert_unchanged(cache, before):
    seen, columns, rings = snapshot(cache)
    assert (seen, columns) == before[:2]
    for (k, v), (k0, v0) in zip(rings, before[2]):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def prefilled(lengths=(6, 2, 4), window=4, layers=2):
    reference, rolling = model_pair(tiny_config(window, layers=layers))
    input_ids, attention_mask = ragged_batch(list(lengths))
    cache = RollingSlidingWindowCache(config=rolling.config)
    with torch.no_grad():
        rolling(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    return reference, rolling, cache, input_ids, attention_mask


def decode_inputs(attention_mask, columns=1):
    ones = torch.ones(attention_mask.shape[0], columns, dtype=attention_mask.dtype)
    return torch.full((attention_mask.shape[0], columns), 5), torch.cat([attention_mask, ones], dim=1)


# --- misuse: a clear error, and the cache as it was -------------------------------------------------------------

def test_model_without_window_attends_fully_without_a_cache_and_refuses_one():
    """No window means a full causal mask: a forward without a cache is Transformers' own answer; a cache is refused."""
    config = tiny_config(4)
    config.sliding_window = None
    reference, model = model_pair(config)
    input_ids, attention_mask = ragged_batch([7, 3])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        got = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no sliding window"):
        RollingSlidingWindowCache(config=config)


def test_cache_window_disagreeing_with_the_model():
    _, rolling, *_ = prefilled()
    cache = RollingSlidingWindowCache(window=3, num_layers=2)
    with pytest.raises(ValueError, match="attends over a sliding window of 4, but the rolling cache keeps a sliding window of 3"):
        rolling(input_ids=torch.ones(1, 2, dtype=torch.long), past_key_values=cache)
    assert cache.seen == [] and cache.get_seq_length() == 0
    assert all(not layer.is_initialized or not layer.keys.any() for layer in cache.layers)  # nothing written


def test_layer_count_change_is_refused_before_any_write():
    _, three_layers = model_pair(tiny_config(4, layers=3))
    cache = RollingSlidingWindowCache(window=4, num_layers=2)
    with pytest.raises(ValueError, match="built for 2 layers but the model has 3"):
        three_layers(input_ids=torch.ones(1, 2, dtype=torch.long), past_key_values=cache)
    assert cache.seen == [] and all(not layer.is_initialized or not layer.keys.any() for layer in cache.layers)


def test_batch_size_change_on_a_live_cache():
    _, rolling, cache, _, attention_mask = prefilled()
    before = snapshot(cache)
    with pytest.raises(ValueError, match="batch of 3 sequences"):
        rolling(input_ids=torch.ones(2, 1, dtype=torch.long), past_key_values=cache)
    assert_unchanged(cache, before)


def test_right_padding_is_refused():
    _, rolling = model_pair(tiny_config(4))
    input_ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    cache = RollingSlidingWindowCache(config=rolling.config)
    with pytest.raises(ValueError, match="right padded.*padding_side = 'left'"):
        rolling.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=2)
    assert cache.seen == []


def test_dtype_change_mid_generation():
    _, rolling, cache, _, attention_mask = prefilled()
    before = snapshot(cache)
    input_ids, mask = decode_inputs(attention_mask)
    rolling.to(torch.float64)
    with pytest.raises(ValueError, match="Keep the model's dtype and device fixed"):
        rolling(input_ids=input_ids, attention_mask=mask, past_key_values=cache)
    assert_unchanged(cache, before)


def test_rollback_past_the_ring():
    _, _, cache, _, _ = prefilled(lengths=(9, 3))
    before = snapshot(cache)
    with pytest.raises(ValueError, match="gone past its ring"):
        cache.crop(-2)
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(3)
    assert_unchanged(cache, before)


def test_another_attention_implementation_writing_into_the_cache():
    _, rolling, cache, _, attention_mask = prefilled()
    before = snapshot(cache)
    rolling.set_attn_implementation("sdpa")
    input_ids, mask = decode_inputs(attention_mask)
    with pytest.raises(ValueError, match="works only with attn_implementation='rolling_xformers'"):
        rolling(input_ids=input_ids, attention_mask=mask, past_key_values=cache)
    assert_unchanged(cache, before)


def test_positions_past_max_position_embeddings_warn_once():
    config = tiny_config(4)
    config.max_position_embeddings = 10
    _, rolling = model_pair(config)
    input_ids, attention_mask = ragged_batch([8])
    cache = RollingSlidingWindowCache(config=rolling.config)
    with pytest.warns(UserWarning, match="past the model's max_position_embeddings \\(10\\)") as record:
        rolling.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         max_new_tokens=8, pad_token_id=0)
    assert sum("max_position_embeddings" in str(w.message) for w in record) == 1


# --- faults: never a half-written cache in an answer ---------------------------------------------------------------

class Boom(Exception):
    pass


def fail_once(module, error=Boom):
    calls = []

    def hook(*_):
        if not calls:
            calls.append(1)
            raise error("injected fault")

    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("layer,layers", [(0, 3), (1, 3), (2, 3)])
def test_exception_inside_a_forward(layer, layers):
    reference, rolling, cache, _, attention_mask = prefilled(layers=layers)
    before = snapshot(cache)
    input_ids, mask = decode_inputs(attention_mask)
    handle = fail_once(rolling.model.layers[layer])
    with pytest.raises(Boom):
        rolling(input_ids=input_ids, attention_mask=mask, past_key_values=cache)
    handle.remove()
    if layer == 0:  # nothing was written: the cache is exactly as before and stays usable
        assert_unchanged(cache, before)
        rolling(input_ids=input_ids, attention_mask=mask, past_key_values=cache)
        assert cache.seen == [s + 1 for s in before[0]]
    else:  # layers 0..k-1 wrote: the cache refuses further use instead of mixing them into an answer
        with pytest.raises(RuntimeError, match="stopped after writing .* call cache.reset\\(\\)"):
            rolling(input_ids=input_ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(RuntimeError, match="cannot be used further"):
            cache.reorder_cache(torch.tensor([0, 1, 2]))


def test_keyboard_interrupt_in_generate_then_reset():
    reference, rolling = model_pair(tiny_config(4, layers=3))
    input_ids, attention_mask = ragged_batch([7, 3])
    cache = RollingSlidingWindowCache(config=rolling.config)
    calls = []

    def interrupt(*_):
        calls.append(1)
        if len(calls) == 5:  # the fifth forward of layer 1: mid-decode, after layer 0 wrote
            raise KeyboardInterrupt

    handle = rolling.model.layers[1].register_forward_pre_hook(interrupt)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                   pad_token_id=0)
    with pytest.raises(KeyboardInterrupt):
        rolling.generate(**options, past_key_values=cache)
    handle.remove()
    with pytest.raises(RuntimeError, match="cannot be used further"):
        rolling.generate(**options, past_key_values=cache)
    cache.reset()
    assert torch.equal(rolling.generate(**options, past_key_values=cache), reference.generate(**options))


# --- long runs and reuse ----------------------------------------------------------------------------------------------

def test_twenty_windows_at_batch_four_flat_memory_and_parity():
    window = 4
    reference, rolling = model_pair(tiny_config(window))
    input_ids, attention_mask = ragged_batch([9, 1, 5, 3])
    cache = RollingSlidingWindowCache(config=rolling.config)
    seen_memory = []

    def record(*_):
        if all(layer.is_initialized for layer in cache.layers):
            seen_memory.append((cache.memory_bytes(), *(l.keys.data_ptr() for l in cache.layers)))

    handle = rolling.model.register_forward_hook(record)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=20 * window, do_sample=False,
                   pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got = rolling.generate(**options, past_key_values=cache)
    handle.remove()
    expected = reference.generate(**options)
    assert torch.equal(got.sequences, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, expected.scores)) < 1e-4
    assert len(seen_memory) == 20 * window and len(set(seen_memory)) == 1
    assert seen_memory[0][0] == 2 * 2 * 4 * window * 2 * 16 * 4  # K,V x layers x B x W x kv heads x dim x fp32


def test_two_models_with_their_own_windows_in_two_threads():
    pairs = {window: model_pair(tiny_config(window), seed=window) for window in (3, 5)}
    input_ids, attention_mask = ragged_batch([11, 4, 7])
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=15, do_sample=False,
                   pad_token_id=0)
    expected = {w: reference.generate(**options) for w, (reference, _) in pairs.items()}
    results, errors = {}, []

    def run(window):
        try:
            _, rolling = pairs[window]
            for round_ in range(3):
                cache = RollingSlidingWindowCache(config=rolling.config)
                results[(window, round_)] = rolling.generate(**options, past_key_values=cache, prefill_chunk_size=2)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(w,)) for w in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (window, _), tokens in results.items():
        assert torch.equal(tokens, expected[window])
    assert not torch.equal(expected[3], expected[5])


def test_a_hole_between_turns_is_refused_before_anything_is_written():
    """Replies of different lengths, left padded after the first turn: Transformers' window counts the padding
    columns between the turns, a ring counts real tokens, so the rolling cache refuses instead of answering."""
    reference, rolling, cache, input_ids, attention_mask = prefilled()
    before = snapshot(cache)
    reply = torch.tensor([[0, 0, 7], [5, 6, 7], [0, 6, 7]])
    reply_mask = (reply != 0).long()
    with pytest.raises(ValueError, match=r"Sequences \[0, 2\] have padding after tokens this cache already holds"):
        rolling(input_ids=reply, attention_mask=torch.cat([attention_mask, reply_mask], 1), past_key_values=cache)
    assert_unchanged(cache, before)
    # the same reply lengths in every row continue as Transformers does
    full = torch.ones(3, 3, dtype=torch.long)
    with torch.no_grad():
        got = rolling(input_ids=torch.full((3, 3), 7), attention_mask=torch.cat([attention_mask, full], 1),
                      past_key_values=cache).logits[:, -1]
        expected = reference(input_ids=torch.cat([input_ids, torch.full((3, 3), 7)], 1),
                             attention_mask=torch.cat([attention_mask, full], 1)).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
