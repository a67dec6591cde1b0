"""Every Transformers family whose layers slide, pure or hybrid, against Transformers' eager path: same tokens,
logits within 1e-4, the reference really windowed, and the cache's layer kinds as Transformers' own."""

import copy
import functools

import pytest
import torch
from transformers import DynamicCache

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import next_turn, ragged_batch, word_tokenizer
from tests.families import FAMILIES, build

SLIDING, FULL = "sliding_attention", "full_attention"  # Transformers' layer_types
WINDOW = 4
PROMPTS = [13, 2, 9]  # ragged, left padded, two of them past the window
NEW = 12


@functools.lru_cache(maxsize=None)
def reference(name, window=WINDOW):
    return build(name, window, seed=1)


@functools.lru_cache(maxsize=None)
def reference_run(name, window=WINDOW):
    input_ids, attention_mask = ragged_batch(PROMPTS, seed=3)
    return reference(name, window).generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )


def rolling(name):
    model = copy.deepcopy(reference(name))
    hf_rolling_cache.enable(model)
    return model


def assert_same(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    worst = max((ours - theirs).abs().max().item() for ours, theirs in zip(got.scores, expected.scores))
    assert worst < 1e-4, worst


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_gives_transformers_tokens(name, chunk):
    model = rolling(name)
    input_ids, attention_mask = ragged_batch(PROMPTS, seed=3)
    cache = RollingSlidingWindowCache(config=model.config)
    got = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False, past_key_values=cache,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        **({} if chunk is None else {"prefill_chunk_size": chunk}),
    )
    assert_same(got, reference_run(name))
    assert cache.is_sliding == DynamicCache(config=model.config).is_sliding  # Transformers' own layer kinds
    held = [n + NEW - 1 for n in PROMPTS]
    assert cache.seen == held
    for layer in cache.layers:  # rings hold exactly W slots; global layers hold at least every token
        assert layer.slot_keys.shape[1] == WINDOW if layer.is_sliding else layer.slot_keys.shape[1] >= max(held)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_reference_really_windows(name):
    """A huge window must change Transformers' own answer, or the parity above would prove nothing about windows."""
    windowed, unwindowed = reference_run(name), reference_run(name, window=10_000)
    worst = max((a - b).abs().max().item() for a, b in zip(windowed.scores, unwindowed.scores))
    assert worst > 1e-3


HYBRIDS = ["gemma3", "gpt_oss", "gemma2"]  # global layers; + sinks; + softcap


def generate_both(name, **options):
    input_ids, attention_mask = ragged_batch(PROMPTS, seed=5)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW, pad_token_id=0, **options)
    torch.manual_seed(11)
    expected = reference(name).generate(**options)
    torch.manual_seed(11)
    got = rolling(name).generate(**options)
    return got, expected


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_sampling_beams_and_return_sequences(name):
    got, expected = generate_both(name, do_sample=True, temperature=0.9, top_k=20, num_return_sequences=2)
    assert torch.equal(got, expected)
    got, expected = generate_both(name, do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_multi_turn_with_one_cache_equals_the_whole_conversation(name):
    model = rolling(name)
    input_ids, attention_mask = ragged_batch(PROMPTS, seed=5)
    cache = RollingSlidingWindowCache(config=model.config)
    first = model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                           max_new_tokens=5, do_sample=False, pad_token_id=0)
    turn, turn_mask = next_turn(first, attention_mask, reply=6, seed=2)
    options = dict(input_ids=turn, attention_mask=turn_mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
                   output_scores=True, return_dict_in_generate=True)
    got = model.generate(**options, past_key_values=cache)
    assert_same(got, reference(name).generate(**options))


@pytest.mark.parametrize("chunk", [1, 5])
def test_hybrid_decode_planned_on_the_device(chunk):
    """The decode plan CUDA graphs replay (device counters, static global buffers), on a hybrid with sinks."""
    model = rolling("gpt_oss")
    input_ids, attention_mask = ragged_batch(PROMPTS, seed=3)
    cache = RollingSlidingWindowCache(config=model.config)
    cache.decode_on_device = True
    got = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, prefill_chunk_size=chunk,
        max_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    assert_same(got, reference_run("gpt_oss"))
    assert type(cache.last_plan).__name__ == "DeviceDecodePlan"


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_pipeline_in_batches_and_disable(name):
    from transformers import pipeline

    model, tokenizer = rolling(name), word_tokenizer()
    generator = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"w{i}" for i in torch.randint(2, 97, (n,), generator=generator).tolist()) for n in (11, 2, 7)]
    options = dict(batch_size=2, max_new_tokens=NEW, do_sample=False, return_full_text=False)
    expected = pipeline("text-generation", model=reference(name), tokenizer=tokenizer)(prompts, **options)
    assert pipeline("text-generation", model=model, tokenizer=tokenizer)(prompts, **options) == expected
    hf_rolling_cache.disable(model)  # the model's own attention and generate again
    assert model.config._attn_implementation == "eager" and not hf_rolling_cache.is_enabled(model)
    assert pipeline("text-generation", model=model, tokenizer=tokenizer)(prompts, **options) == expected


def test_memory_by_kind_rings_flat_global_layers_grow():
    model = rolling("gemma3")
    cache = RollingSlidingWindowCache(config=model.config)
    input_ids, attention_mask = ragged_batch([6, 3], seed=1)
    sizes = []
    for new in (10, 300):
        cache.reset()
        model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=new,
                       do_sample=False, pad_token_id=0)
        sizes.append((cache.memory_bytes(SLIDING), cache.memory_bytes(FULL)))
    layer = cache.layers[0]
    ring_bytes = 2 * 2 * WINDOW * layer.slot_keys.shape[2] * layer.slot_keys.shape[3] * 4 * model.config.layer_types.count(SLIDING)
    assert sizes[0][0] == sizes[1][0] == ring_bytes  # flat
    assert sizes[1][1] > sizes[0][1]  # global layers keep every token
    assert cache.memory_bytes() == sum(sizes[1])


def test_max_length_preallocates_global_layers():
    model = rolling("gemma3")
    cache = RollingSlidingWindowCache(config=model.config, max_length=40)
    input_ids, attention_mask = ragged_batch([6, 3], seed=1)
    model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=20,
                   do_sample=False, pad_token_id=0)
    assert {layer.slot_keys.shape[1] for layer in cache.layers if not layer.is_sliding} == {40}


def test_mask_sizes_per_kind():
    model = rolling("gemma3")
    cache = RollingSlidingWindowCache(config=model.config)
    input_ids, attention_mask = ragged_batch([9, 3], seed=1)
    model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    sliding, full = model.config.layer_types.index(SLIDING), model.config.layer_types.index(FULL)
    assert cache.get_mask_sizes(1, sliding) == (WINDOW + 1, 9 - WINDOW)
    assert cache.get_mask_sizes(1, full) == (10, 0)


# --- refusals, one per case -------------------------------------------------------------------------------------
def test_bidirectional_gemma3_is_refused():
    model = build("gemma3", WINDOW)
    model.config.use_bidirectional_attention = True
    model = type(model)(model.config).eval()
    hf_rolling_cache.enable(model)
    input_ids, attention_mask = ragged_batch([6], seed=1)
    with pytest.raises(ValueError, match="another mask"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2)


def test_shared_kv_layers_are_refused():
    config = FAMILIES["gemma3n"].make_config(WINDOW)
    config.num_kv_shared_layers = 2
    config = type(config)(**config.to_dict())
    with pytest.raises(ValueError, match="dummy"):
        RollingSlidingWindowCache(config=config)


@pytest.mark.parametrize("model_type", ["moshi", "doge"])
def test_families_whose_window_is_not_plain_are_refused(model_type):
    config = FAMILIES["mistral"].make_config(WINDOW)
    config.model_type = model_type
    with pytest.raises(ValueError, match="not a plain sliding window"):
        RollingSlidingWindowCache(config=config)


def test_a_stateful_model_is_refused():
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, lru_width=32, attention_window_size=4)
    model = RecurrentGemmaForCausalLM(config).eval()
    with pytest.raises(ValueError, match="keeps its own kind of cache"):
        hf_rolling_cache.enable(model)
