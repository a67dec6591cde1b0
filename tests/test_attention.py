"""The attention function: a whole forward against eager attention, and the inputs it refuses (its kernels:
test_kernels.py)."""

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import model_pair, ragged_batch, tiny_config


@pytest.mark.parametrize("window", [3, 8])
def test_forward_without_cache_matches_eager(window):
    reference, rolling = model_pair(tiny_config(window))
    input_ids, attention_mask = ragged_batch([11, 4, 7])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        got = rolling(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_rolling_attention_refuses_another_cache():
    _, rolling = model_pair(tiny_config(4))
    input_ids, attention_mask = ragged_batch([5, 5])
    cache = DynamicCache(config=rolling.config)
    with torch.no_grad():
        rolling(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)  # prefill: no history yet
        with pytest.raises(ValueError, match="needs a RollingSlidingWindowCache"):
            rolling(input_ids=input_ids[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), past_key_values=cache)


def test_rolling_attention_refuses_a_4d_mask():
    _, rolling = model_pair(tiny_config(4))
    input_ids, _ = ragged_batch([3])
    with pytest.raises(ValueError, match="2D padding mask"):
        rolling(input_ids=input_ids, attention_mask=torch.zeros(1, 1, 3, 3), use_cache=False)

