"""The cache: exact ring contents, B x W slots per layer forever, in-place writes, row operations."""

import pytest
import torch

from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import held_positions, layer0_key, model_pair, ragged_batch, tiny_config


def generate(model, lengths, new_tokens, chunk=None):
    input_ids, attention_mask = ragged_batch(lengths)
    cache = RollingSlidingWindowCache(config=model.config)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        max_new_tokens=new_tokens,
        do_sample=False,
        prefill_chunk_size=chunk,
        pad_token_id=0,
    )
    return out, cache


@pytest.mark.parametrize("chunk", [None, 2, 5])
def test_ring_holds_exactly_the_newest_window_of_each_sequence(chunk):
    window = 4
    _, model = model_pair(tiny_config(window))
    lengths = [6, 1, 3]
    out, cache = generate(model, lengths, new_tokens=7, chunk=chunk)
    width = max(lengths)
    ring = cache.layers[0].slot_keys  # [B, W, H_kv, D]
    for row, length in enumerate(lengths):
        tokens = out[row, width - length :].tolist()[:-1]  # the last generated token was never fed back
        assert cache.seen[row] == len(tokens)
        held = held_positions(len(tokens), window)
        assert cache.slot_positions()[row] == held
        for slot, position in enumerate(held):
            if position < 0:
                assert torch.count_nonzero(ring[row, slot]) == 0  # never written: no padding got in
            else:
                torch.testing.assert_close(ring[row, slot], layer0_key(model, tokens[position], position))


def test_memory_is_b_times_w_slots_and_never_reallocated():
    window, lengths = 3, [9, 2]
    _, model = model_pair(tiny_config(window, kv_heads=2, head_dim=16))
    input_ids, attention_mask = ragged_batch(lengths)
    cache = RollingSlidingWindowCache(config=model.config)
    pointers, sizes = set(), set()

    def record(*_):  # after every forward: every layer has written its ring
        for layer in cache.layers:
            pointers.add((layer.keys.data_ptr(), layer.values.data_ptr()))
        sizes.add(cache.memory_bytes())

    handles = [model.model.register_forward_hook(record)]
    try:
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
            max_new_tokens=6 * window, do_sample=False, pad_token_id=0,
        )
    finally:
        for handle in handles:
            handle.remove()
    per_layer = 2 * len(lengths) * window * 2 * 16 * 4  # K and V, B x W slots, 2 kv heads x 16 dims, fp32
    assert sizes == {per_layer * model.config.num_hidden_layers}
    assert len(pointers) == model.config.num_hidden_layers  # same storage from the first write to the last
    assert tuple(cache.layers[0].slot_keys.shape) == (2, window, 2, 16)


def test_seq_length_counts_columns_and_seen_counts_real_tokens():
    _, model = model_pair(tiny_config(4))
    out, cache = generate(model, [5, 2], new_tokens=3)
    assert cache.get_seq_length() == 5 + 2  # columns: the padded prompt, then two fed-back tokens
    assert cache.seen == [7, 4]
    assert cache.get_max_length() == -1


def test_row_operations_keep_rings_and_counters_together():
    _, model = model_pair(tiny_config(4))
    _, cache = generate(model, [6, 2, 3], new_tokens=2)
    rings = cache.layers[1].keys.clone()
    seen = cache.seen
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert cache.seen == [seen[2], seen[0], seen[0]]
    torch.testing.assert_close(cache.layers[1].keys, rings[[2, 0, 0]])
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.seen == [seen[0]]
    cache.batch_repeat_interleave(2)
    assert cache.seen == [seen[0]] * 2
    torch.testing.assert_close(cache.layers[1].keys, rings[[0, 0]])


def test_crop_within_the_window_and_refused_past_it():
    _, model = model_pair(tiny_config(8))
    _, cache = generate(model, [3, 2], new_tokens=3)  # seen [5, 4] <= window
    cache.crop(-2)
    assert cache.seen == [3, 2] and cache.get_seq_length() == 3
    cache.crop(0)  # Transformers 5: a no-op
    assert cache.seen == [3, 2] and cache.get_seq_length() == 3
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(2)  # the legacy "length to keep", which Transformers 5 refuses too
    _, wrapped = generate(model, [3, 2], new_tokens=9)  # seen [11, 10] > window
    with pytest.raises(ValueError, match="gone past its ring"):
        wrapped.crop(-2)  # a ring without slack rolls back one token exactly, not two
    assert wrapped.seen == [11, 10]  # unchanged


def rollback_case(slack: int, length: int):
    """Window 4: the reference and rolling models, ``length`` true tokens, slack + 1 draft tokens to roll back,
    and an empty cache with ``slack``."""
    reference, model = model_pair(tiny_config(4))
    tokens = torch.randint(1, 97, (1, length), generator=torch.Generator().manual_seed(length))
    drafts = torch.randint(1, 97, (1, slack + 1), generator=torch.Generator().manual_seed(length + 1))
    return reference, model, tokens, drafts, RollingSlidingWindowCache(config=model.config, slack=slack)


@pytest.mark.parametrize("slack", [0, 2])
@pytest.mark.parametrize("decode_drafts", [True, False])
def test_a_wrapped_ring_rolls_back_slack_plus_one_tokens_exactly(slack, decode_drafts):
    """The next token's window needs only the window - 1 tokens before it, so the slot a rolled-back token
    overwrote is read by no one: after ``crop(-(slack + 1))`` a later prefill chunk and decode steps give the
    reference's logits (the model run over the true tokens, without a cache)."""
    reference, model, tokens, drafts, cache = rollback_case(slack, length=20)
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        model(input_ids=tokens[:, :11], past_key_values=cache)  # wrapped: 11 tokens > window + slack slots
        if decode_drafts:  # one token a step, as a deferred stop check's extra step
            for column in range(drafts.shape[1]):
                model(input_ids=drafts[:, column : column + 1], past_key_values=cache)
        else:  # verified all at once, as assisted decoding does
            model(input_ids=drafts, past_key_values=cache)
        cache.crop(-drafts.shape[1])
        assert cache.seen == [11]
        chunk = model(input_ids=tokens[:, 11:14], past_key_values=cache).logits  # a later prefill chunk
        steps = [model(input_ids=tokens[:, c : c + 1], past_key_values=cache).logits for c in range(14, 20)]
    torch.testing.assert_close(chunk, expected[:, 11:14], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected[:, 14:20], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="gone past its ring"):
        cache.crop(-(slack + 2))


def test_reset_forgets_everything():
    _, model = model_pair(tiny_config(4))
    _, cache = generate(model, [3, 2], new_tokens=3)
    cache.reset()
    assert cache.seen == [] and cache.get_seq_length() == 0
    assert all(torch.count_nonzero(layer.keys) == 0 for layer in cache.layers)


def test_window_from_config_or_explicit():
    config = tiny_config(6)
    assert RollingSlidingWindowCache(config=config).window == 6
    assert RollingSlidingWindowCache(window=5, num_layers=2).window == 5
    with pytest.raises(ValueError, match="disagrees"):
        RollingSlidingWindowCache(config=config, window=5)
    config.sliding_window = None
    with pytest.raises(ValueError, match="no sliding window"):
        RollingSlidingWindowCache(config=config)
    with pytest.raises(ValueError, match="positive int"):
        RollingSlidingWindowCache(window=0, num_layers=2)


def test_cache_refuses_other_attention_implementations():
    reference, _ = model_pair(tiny_config(4))
    input_ids, attention_mask = ragged_batch([3])
    cache = RollingSlidingWindowCache(config=reference.config)
    with pytest.raises(ValueError, match="set_attn_implementation\\('rolling_xformers'\\)"):
        reference(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    assert cache.seen == [] and not cache.layers[0].is_initialized


def test_cache_refuses_another_batch():
    _, model = model_pair(tiny_config(4))
    _, cache = generate(model, [3, 2], new_tokens=2)
    input_ids, attention_mask = ragged_batch([3, 3, 3])
    with pytest.raises(ValueError, match="batch of 2 sequences"):
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    other_ids, other_mask = ragged_batch([4, 4])  # same batch size, other history
    with pytest.raises(ValueError, match="columns|belongs to another batch"):
        model(input_ids=other_ids, attention_mask=other_mask, past_key_values=cache)
    assert cache.seen == [4, 3]


def test_a_config_copy_of_the_same_model_serves_and_a_foreign_attention_is_refused_clearly():
    """A cache built from a copy of the config (as AutoConfig.from_pretrained gives) serves the rolling model; if the
    model's attention is another one, the staged keys it touches raise an error that says what to do."""
    reference, model = model_pair(tiny_config(4))
    copy_of_config = type(model.config).from_dict(model.config.to_dict())
    assert getattr(copy_of_config, "_attn_implementation", None) is None
    input_ids, attention_mask = ragged_batch([7, 3])
    expected, _ = generate(model, [7, 3], new_tokens=5)
    got = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
                         pad_token_id=0, past_key_values=RollingSlidingWindowCache(config=copy_of_config))
    assert torch.equal(got, expected)
    with pytest.raises(AttributeError, match="set_attn_implementation\\('rolling_xformers'\\)"):
        reference(input_ids=input_ids, attention_mask=attention_mask,
                  past_key_values=RollingSlidingWindowCache(config=copy_of_config))


def test_reset_serves_a_batch_of_another_size():
    reference, model = model_pair(tiny_config(4))
    _, cache = generate(model, [7, 3], new_tokens=4)
    cache.reset()
    input_ids, attention_mask = ragged_batch([9, 2, 5])
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**options, past_key_values=cache), reference.generate(**options))
    assert cache.layers[0].keys.shape[0] == 3


def test_keys_and_values_in_transformers_layout_are_views_of_the_slots():
    """Code written for Transformers' caches reads layer.keys as [B, H_kv, S, D]: the same storage, in slot order."""
    _, model = model_pair(tiny_config(4))
    _, cache = generate(model, [6, 2], new_tokens=3)
    layer = cache.layers[0]
    assert tuple(layer.keys.shape) == (2, 2, 4, 16) and tuple(layer.slot_keys.shape) == (2, 4, 2, 16)
    assert layer.keys.data_ptr() == layer.slot_keys.data_ptr()
    torch.testing.assert_close(layer.values[1, :, 3], layer.slot_values[1, 3])
    stored = layer.keys.clone()
    layer.offload()  # Transformers' own layer code assigns keys in its layout: stored back in ours
    assert layer.keys.device.type == "cpu" and torch.equal(layer.keys, stored) and layer.slot_keys.is_contiguous()


@pytest.mark.parametrize("slack", [0, 1])
def test_rollbacks_one_after_another_count_together(slack):
    """The ring is exact to slack + 1 tokens below the most it has held: a second rollback before new tokens pass
    that mark is refused (the first one's slots are gone), one after they pass it is exact."""
    reference, model, tokens, junk, cache = rollback_case(slack, length=24)
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        model(input_ids=tokens[:, :12], past_key_values=cache)
        model(input_ids=junk, past_key_values=cache)
        cache.crop(-junk.shape[1])
        with pytest.raises(ValueError, match="gone past its ring"):
            cache.crop(-1)  # 12 + slack + 1 held at most: one more token back is past what the ring keeps
        model(input_ids=tokens[:, 12:13], past_key_values=cache)
        with pytest.raises(ValueError, match="gone past its ring"):
            cache.crop(-2)  # to 11, slack + 2 below the mark 12 + slack + 1 (13 held now: alone, fine for slack 1)
        assert cache.seen == [13]
        model(input_ids=tokens[:, 13 : 14 + slack], past_key_values=cache)  # past the mark: 14 + slack tokens
        model(input_ids=junk, past_key_values=cache)
        cache.crop(-junk.shape[1])  # exact again
        steps = [model(input_ids=tokens[:, c : c + 1], past_key_values=cache).logits for c in range(14 + slack, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected[:, 14 + slack : 24], rtol=0, atol=1e-5)
