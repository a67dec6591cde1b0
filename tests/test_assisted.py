"""Assisted and prompt-lookup decoding: draft tokens verified in one forward, the rejected ones rolled back. A ring
with slack (window + slack slots) makes each rollback exact, so the tokens are Transformers' own, past the window."""

import copy

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, tiny_config

WINDOW = 4


def repetitive_prompt(length=24, period=5, seed=0):
    """A prompt that repeats itself, so prompt lookup finds drafts that are often right and sometimes wrong."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randint(1, 97, (period,), generator=generator)
    return pattern.repeat(length // period + 1)[None, :length]


def both(options):
    reference, rolling = model_pair(tiny_config(WINDOW))
    hf_rolling_cache.enable(rolling)
    expected = reference.generate(**options)
    got = rolling.generate(**options)
    return got, expected


def assert_same(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("drafts", [2, 6])
def test_prompt_lookup_gives_transformers_tokens_past_the_window(drafts):
    input_ids = repetitive_prompt()
    options = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=40,
                   do_sample=False, prompt_lookup_num_tokens=drafts, output_scores=True,
                   return_dict_in_generate=True, pad_token_id=0)
    assert_same(*both(options))


def test_an_assistant_model_gives_transformers_tokens_past_the_window():
    assistant_config = tiny_config(WINDOW, layers=1)
    torch.manual_seed(3)
    from transformers import MistralForCausalLM

    assistant = MistralForCausalLM(assistant_config).eval()
    assistant.generation_config.num_assistant_tokens = 3
    input_ids = repetitive_prompt(seed=1)
    options = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=30,
                   do_sample=False, assistant_model=copy.deepcopy(assistant), output_scores=True,
                   return_dict_in_generate=True, pad_token_id=0)
    assert_same(*both(options))


def test_a_ring_with_slack_rolls_back_exactly_and_refuses_more():
    _, model = model_pair(tiny_config(WINDOW))
    model.set_attn_implementation("rolling_xformers")
    cache = RollingSlidingWindowCache(config=model.config, slack=3)
    input_ids = repetitive_prompt(length=12)
    with torch.no_grad():
        model(input_ids=input_ids, past_key_values=cache)
    assert cache.layers[0].slot_keys.shape[1] == WINDOW + 3 and cache.is_croppable
    with pytest.raises(ValueError, match="slack=N"):
        cache.crop(-5)  # past its ring of 7 slots, 5 > slack + 1
    cache.crop(-4)
    assert cache.seen == [8]

