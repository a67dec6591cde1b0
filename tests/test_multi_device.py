"""A model split over devices (Accelerate's device_map): each ring on its layer's device, the same tokens and
logits as on one device. Runs on the one-GPU machine with some layers on "cpu" and the rest on "cuda:0"."""

import copy

import pytest
import torch
from accelerate import dispatch_model

from hf_rolling_cache import RollingSlidingWindowCache, use_cuda_graphs
from tests.conftest import model_pair, ragged_batch, tiny_config

pytestmark = pytest.mark.gpu

SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": 0,
    "model.layers.3": 0,
    "model.norm": 0,
    "lm_head": 0,
}


@pytest.mark.parametrize("chunk", [None, 5])
def test_layers_on_cpu_and_cuda_match_one_device(chunk):
    _, rolling = model_pair(tiny_config(8, layers=4))
    one_device = copy.deepcopy(rolling).to("cuda")
    # main_device="cpu": the "cpu" layers run on the CPU (otherwise Accelerate offloads them and runs them on GPU)
    split = dispatch_model(copy.deepcopy(rolling), device_map=SPLIT, main_device="cpu")
    use_cuda_graphs(split)  # must leave a model spread over devices to the eager path
    input_ids, attention_mask = ragged_batch([37, 2, 19, 11])
    options = dict(attention_mask=attention_mask, max_new_tokens=30, do_sample=False, prefill_chunk_size=chunk,
                   output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    expected = one_device.generate(
        input_ids=input_ids.cuda(), **{**options, "attention_mask": attention_mask.cuda()},
        past_key_values=RollingSlidingWindowCache(config=one_device.config),
    )
    cache = RollingSlidingWindowCache(config=split.config)
    got = split.generate(input_ids=input_ids, **options, past_key_values=cache)
    assert torch.equal(got.sequences.cpu(), expected.sequences.cpu())
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours.cpu(), theirs.cpu(), rtol=0, atol=1e-4)
    assert [layer.keys.device.type for layer in cache.layers] == ["cpu", "cpu", "cuda", "cuda"]
    assert cache.decode_graph is None
