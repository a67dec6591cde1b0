"""Refusals up front: every model, config or option the rolling cache would answer differently from Transformers."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hf_rolling_cache
from hf_rolling_cache._support import FULL, SLIDING, layer_windows
from hf_rolling_cache.attention import RollingMask, rolling_attention_forward
from tests.conftest import model_pair, ragged_batch, tiny_config
from tests.families import FAMILIES

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def qwen2(**options):
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, **options)).eval()


@pytest.mark.parametrize("window", [None, 4])
def test_a_model_whose_layers_do_not_slide_is_refused(window):
    model = qwen2(sliding_window=4, use_sliding_window=False)  # Transformers: every layer full
    with pytest.raises(ValueError, match="No layer of this Qwen2Config slides"):
        hf_rolling_cache.enable(model, window=window)
    assert not hf_rolling_cache.is_enabled(model) and model.config._attn_implementation != "rolling_xformers"


def test_a_config_without_a_window_is_a_value_error():
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    with pytest.raises(ValueError, match="no sliding window"):
        hf_rolling_cache.enable(model)
    config = copy.deepcopy(model.config)
    config.sliding_window = 0
    with pytest.raises(ValueError, match="sliding_window is 0"):
        layer_windows(config)


def test_layers_that_are_not_attention_are_refused():
    config = tiny_config(4)
    config.layer_types = ["sliding_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        layer_windows(config)


def test_per_layer_windows_that_differ_are_refused(monkeypatch):
    """Per-layer configs (Transformers' heterogeneous configs) could give sliding layers different windows."""
    kinds = ([SLIDING, SLIDING, FULL], [{"sliding_window": 4}, {"sliding_window": 8}, {}])
    monkeypatch.setattr("hf_rolling_cache._support.get_layer_types_and_kwargs", lambda config: kinds)
    with pytest.raises(ValueError, match=r"different windows \[4, 8\]"):
        layer_windows(FAMILIES["gemma3"].make_config(4))


def test_a_window_on_a_model_that_never_slides_is_refused_before_anything_is_written():
    """Llama builds a full causal mask whatever config.sliding_window says: windowing it would change its answer."""
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    hf_rolling_cache.enable(model, window=4)
    input_ids, attention_mask = ragged_batch([9, 3])
    cache = hf_rolling_cache.RollingSlidingWindowCache(config=model.config)
    with pytest.raises(ValueError, match="full causal mask"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=2)
    assert cache.seen == [] and not any(layer.is_initialized and layer.keys.any() for layer in cache.layers)


def test_output_attentions_is_refused():
    _, model = model_pair(tiny_config(4))
    hf_rolling_cache.enable(model)
    input_ids, attention_mask = ragged_batch([9, 3])
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2,
                       output_attentions=True, return_dict_in_generate=True)


def test_packed_sequences_from_position_ids_are_refused():
    """Without an attention_mask, Transformers reads packed sequences from position_ids resets (an overlay)."""
    _, model = model_pair(tiny_config(4))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match="another mask"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), position_ids=position_ids, use_cache=False)


def test_an_attention_option_it_does_not_implement_is_refused():
    query = torch.zeros(1, 4, 2, 16)
    keys = torch.zeros(1, 2, 2, 16)
    mask = RollingMask(batch_size=1, q_length=2, window=4, padding_mask=None)
    with pytest.raises(ValueError, match=r"\['block_table'\]"):
        rolling_attention_forward(torch.nn.Module(), query, keys, keys, mask, block_table=torch.zeros(1))


def test_use_cache_false_is_transformers_own_path():
    """No cache means no chunked prefill: each chunk would otherwise run without the ones before it."""
    reference, model = model_pair(tiny_config(4))
    hf_rolling_cache.enable(model, prefill_chunk_size=3)
    input_ids, attention_mask = ragged_batch([11, 5])
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                   use_cache=False, output_scores=True, return_dict_in_generate=True)
    expected, got = reference.generate(**options), model.generate(**options)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_loss_arguments_that_travel_with_the_forward_are_not_refused():
    """Transformers passes the loss's num_items_in_batch and shift_labels down to the attention with **kwargs."""
    reference, model = model_pair(tiny_config(4))
    input_ids, attention_mask = ragged_batch([7, 5])
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # padded positions carry no loss
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    shifted = shifted.masked_fill(attention_mask == 0, -100)  # nor do predictions made at padded positions
    options = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                   num_items_in_batch=torch.tensor(10), shift_labels=shifted)
    with torch.no_grad():
        expected, got = reference(**options).loss, model(**options).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
