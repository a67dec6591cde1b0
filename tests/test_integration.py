"""`enable` / `disable`: plain generate, every generation mode, multi-turn, pipelines and Accelerate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, next_turn, ragged_batch, tiny_config, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [9, 2, 6]  # ragged, longer than the window


@pytest.fixture()
def pair():
    reference, rolling = model_pair(tiny_config(4))
    hf_rolling_cache.enable(rolling)
    return reference, rolling


def generate_both(reference, rolling, seed=3, **options):
    input_ids, attention_mask = ragged_batch(LENGTHS)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=14, pad_token_id=0,
                   output_scores=True, return_dict_in_generate=True, **options)
    torch.manual_seed(seed)
    expected = reference.generate(**options)
    torch.manual_seed(seed)
    got = rolling.generate(**options)
    return expected, got


def assert_same(expected, got):
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        finite = torch.isfinite(theirs)  # top-k / top-p set the rest to -inf on both sides
        assert torch.equal(finite, torch.isfinite(ours))
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=False),
        dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
        dict(do_sample=False, num_beams=3),
        dict(do_sample=True, num_return_sequences=2),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
    ],
    ids=["greedy", "sampling", "beams", "return-2-sampled", "return-2-beams"],
)
def test_generation_modes_match_the_reference(pair, mode):
    expected, got = generate_both(*pair, **mode)
    assert_same(expected, got)
    assert got.past_key_values.__class__ is RollingSlidingWindowCache  # a fresh rolling cache was used


def test_finished_sequences_stop_like_the_reference(pair):
    reference, rolling = pair
    greedy, _ = generate_both(reference, rolling, do_sample=False)
    eos = int(greedy.sequences[1, -8])  # a token that sequence 1 emits mid-way
    expected, got = generate_both(reference, rolling, do_sample=False, eos_token_id=eos)
    assert_same(expected, got)
    assert (got.sequences == 0).sum() > (greedy.sequences == 0).sum()  # finished rows were padded


def test_early_exit_drafting_is_refused_before_anything_runs(pair):
    """Self-speculation drafts with the model's own first layers, which would share its rolling cache."""
    _, rolling = pair
    calls = []
    handle = rolling.register_forward_pre_hook(lambda *_: calls.append(1))
    input_ids, attention_mask = ragged_batch([9])
    try:
        for cache in (None, RollingSlidingWindowCache(config=rolling.config)):  # a fresh cache, or the user's
            with pytest.raises(ValueError, match="assistant_early_exit.*disable"):
                rolling.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4,
                                 assistant_early_exit=1, past_key_values=cache)
    finally:
        handle.remove()
    assert calls == []


def test_disable_restores_the_model():
    _, model = model_pair(tiny_config(4))
    model.set_attn_implementation("sdpa")
    hf_rolling_cache.enable(model, window=3, prefill_chunk_size=2)
    assert model.config._attn_implementation == "rolling_xformers" and model.config.sliding_window == 3
    hf_rolling_cache.enable(model, window=3)  # twice is harmless
    hf_rolling_cache.disable(model)
    assert model.config._attn_implementation == "sdpa" and model.config.sliding_window == 4
    assert "generate" not in vars(model) and not hf_rolling_cache.is_enabled(model)
    with pytest.raises(ValueError, match="no sliding window"):
        model.config.sliding_window = None
        hf_rolling_cache.enable(model)


def test_enable_with_a_window_matches_the_reference_with_that_window():
    reference, rolling = model_pair(tiny_config(8))
    hf_rolling_cache.enable(rolling, window=3)
    reference.config.sliding_window = 3
    assert_same(*generate_both(reference, rolling, do_sample=False))


@pytest.mark.parametrize("lengths", [[7], LENGTHS])
def test_multi_turn_with_the_same_cache_equals_the_whole_conversation(pair, lengths):
    reference, rolling = pair
    input_ids, attention_mask = ragged_batch(lengths)
    cache = RollingSlidingWindowCache(config=rolling.config)
    first = rolling.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             max_new_tokens=6, do_sample=False, pad_token_id=0)
    conversation, mask = next_turn(first, attention_mask, reply=5, seed=9)
    options = dict(input_ids=conversation, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                   output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(**options)
    got = rolling.generate(**options, past_key_values=cache)
    assert_same(expected, got)


def test_a_cache_from_another_batch_is_refused(pair):
    _, rolling = pair
    input_ids, attention_mask = ragged_batch(LENGTHS)
    cache = RollingSlidingWindowCache(config=rolling.config)
    rolling.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=3,
                     pad_token_id=0)
    other_ids, other_mask = ragged_batch([12, 12, 12], seed=5)
    with pytest.raises(ValueError, match="another batch|columns"):
        rolling.generate(input_ids=other_ids, attention_mask=other_mask, past_key_values=cache, max_new_tokens=3,
                         pad_token_id=0)


def test_text_generation_pipeline_in_batches_twice(pair):
    from transformers import pipeline

    reference, rolling = pair
    tokenizer = word_tokenizer()
    generator = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"w{i}" for i in torch.randint(2, 97, (n,), generator=generator).tolist()) for n in (11, 2, 7, 5)]
    options = dict(batch_size=3, max_new_tokens=10, do_sample=False, return_full_text=False)
    expected = pipeline("text-generation", model=reference, tokenizer=tokenizer)(prompts, **options)
    rolling_pipe = pipeline("text-generation", model=rolling, tokenizer=tokenizer)
    assert rolling_pipe(prompts, **options) == expected
    assert rolling_pipe(prompts[::-1], **options) == expected[::-1]  # a second call, other batches


def test_accelerate_data_parallel_equals_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "examples" / "accelerate_generate.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for command in ([*launch, script, "--out", str(tmp_path / "two.json")],
                    [sys.executable, script, "--out", str(tmp_path / "one.json")]):
        run = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
        assert run.returncode == 0, f"{command[-3:]} exited {run.returncode}:\n{run.stderr[-4000:]}"
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["outputs"] == one["outputs"] and len(one["outputs"]) == 8


def test_enable_and_graphs_put_back_an_instance_forward_and_generate():
    """A model dispatched by Accelerate has an instance `forward` (its hook); a user may wrap `generate` too: both
    come back exactly after disable / release_cuda_graphs."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    _, model = model_pair(tiny_config(4))
    add_hook_to_module(model, ModelHook())
    hooked_forward = model.forward
    assert "forward" in vars(model)

    def user_generate(*args, **kwargs):
        return type(model).generate(model, *args, **kwargs)

    model.generate = user_generate
    hf_rolling_cache.enable(model)
    hf_rolling_cache.use_cuda_graphs(model)
    hf_rolling_cache.release_cuda_graphs(model)
    hf_rolling_cache.disable(model)
    assert vars(model)["forward"] is hooked_forward and vars(model)["generate"] is user_generate


def test_inputs_embeds_and_an_explicit_no_chunking(pair):
    reference, rolling = pair
    input_ids, attention_mask = ragged_batch(LENGTHS)
    embeds = rolling.get_input_embeddings()(input_ids)
    options = dict(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                   pad_token_id=0)
    assert torch.equal(rolling.generate(**options), reference.generate(**options))
    with pytest.raises(ValueError, match="splits input_ids only"):
        rolling.generate(**options, prefill_chunk_size=3)
    ids_options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                       pad_token_id=0)
    assert torch.equal(rolling.generate(**ids_options, prefill_chunk_size=None), reference.generate(**ids_options))


def test_options_that_would_mislead_are_refused(pair):
    _, rolling = pair
    input_ids, attention_mask = ragged_batch(LENGTHS)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, pad_token_id=0)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        rolling.generate(**options, cache_implementation="static")
    with pytest.raises(ValueError, match="hidden states of the last prompt chunk"):
        rolling.generate(**options, output_hidden_states=True, return_dict_in_generate=True)
    cache = RollingSlidingWindowCache(config=rolling.config)
    rolling.generate(**options, past_key_values=cache)
    short_ids, short_mask = ragged_batch([2, 3, 1, 2])
    with pytest.raises(ValueError, match="pass the whole conversation"):
        rolling.generate(input_ids=short_ids, attention_mask=short_mask, past_key_values=cache, max_new_tokens=2)


def test_a_batch_padded_to_a_fixed_length_with_a_first_chunk_of_padding(pair):
    """padding="max_length": the first prefill chunk can be all padding; it changes nothing, as in Transformers."""
    reference, rolling = pair
    input_ids, attention_mask = ragged_batch([3, 2])
    pad = torch.zeros(2, 6, dtype=torch.long)
    input_ids, attention_mask = torch.cat([pad, input_ids], 1), torch.cat([pad, attention_mask], 1)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                   pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    got, expected = rolling.generate(**options, prefill_chunk_size=4), reference.generate(**options)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
