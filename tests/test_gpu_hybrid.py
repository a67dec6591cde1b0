"""On CUDA: hybrid models (global layers, sinks, softcap) with the xFormers kernels, CUDA graphs and compiled
layers give Transformers' eager tokens and logits in fp32; a model split over two GPUs gives one GPU's answer, every
time. Skipped without a GPU (see conftest); the two-GPU test needs two."""

import copy

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, ragged_batch, tiny_config
from tests.families import build

pytestmark = pytest.mark.gpu

WINDOW = 8
LENGTHS = [37, 2, 19, 64]
NEW = 3 * WINDOW


def generate(model, **options):
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, seed=3))
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=0, **options)


def assert_same(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("path", ["eager", "graphs", "compiled"])
@pytest.mark.parametrize("name", ["gemma3", "gpt_oss", "gemma2"])
def test_hybrid_on_cuda_gives_transformers_tokens_in_fp32(name, path):
    reference = build(name, WINDOW, seed=2).cuda()
    expected = generate(reference)
    model = copy.deepcopy(reference)
    hf_rolling_cache.enable(model, prefill_chunk_size=5)
    if path != "eager":
        hf_rolling_cache.use_cuda_graphs(model, compile=path == "compiled")
    cache = RollingSlidingWindowCache(config=model.config)
    got = generate(model, past_key_values=cache, prefill_chunk_size=5)
    assert_same(got, expected)
    if path != "eager":
        assert cache.decode_graph is not None, "no decode step was replayed"


def test_global_layers_growing_under_graphs_recapture():
    """A global layer that outgrows its buffer gets a new one: the graph is captured again, never overruns."""
    reference = build("gemma3", WINDOW, seed=2).cuda()
    model = copy.deepcopy(reference)
    model.set_attn_implementation("rolling_xformers")
    hf_rolling_cache.use_cuda_graphs(model)
    options = dict(max_new_tokens=300)
    cache = RollingSlidingWindowCache(config=model.config)  # no max_length: starts at 256 slots and doubles
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, seed=3))
    got = model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0, **options)
    want = reference.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0, **options)
    assert_same(got, want)
    assert {layer.slot_keys.shape[1] for layer in cache.layers if not layer.is_sliding} == {512}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_over_two_gpus_is_one_gpus_answer_every_time(dtype):
    """Layers on cuda:0 and cuda:1 (Accelerate's dispatch): the kernels and copies of each layer run on its own
    device. 20 generations, each equal to the one-GPU answer (an ordering fault shows up as a difference or a
    crash, not always the same one)."""
    from accelerate import dispatch_model

    _, rolling = model_pair(tiny_config(WINDOW, layers=4, heads=8, kv_heads=2, head_dim=64))
    rolling = rolling.to(dtype)
    one_gpu = copy.deepcopy(rolling).cuda()
    split_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                 "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    split = dispatch_model(copy.deepcopy(rolling), device_map=split_map)
    expected = generate(one_gpu, past_key_values=RollingSlidingWindowCache(config=one_gpu.config))
    for _ in range(20):
        cache = RollingSlidingWindowCache(config=split.config)
        got = generate(split, past_key_values=cache, prefill_chunk_size=WINDOW)
        assert torch.equal(got.sequences.cpu(), expected.sequences.cpu())
        worst = max((a.cpu().float() - b.cpu().float()).abs().max().item()
                    for a, b in zip(got.scores, expected.scores))
        assert worst <= (1e-4 if dtype == torch.float32 else 1e-2), worst
    assert {str(layer.keys.device) for layer in cache.layers} == {"cuda:0", "cuda:1"}


TWO_GPU_MAPS = {
    # the decoder split in two: one graph segment per GPU
    "halves": {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
               "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1},
    # back to the first GPU for the head: three segments, two of them on cuda:0
    "there_and_back": {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                       "model.layers.2": 1, "model.layers.3": 0, "model.norm": 0, "lm_head": 0},
    # the inputs' GPU holds no decoder layer: not capturable in segments, decoded eagerly (with a warning)
    "layers_elsewhere": {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 1, "model.layers.1": 1,
                         "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1},
}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "compiled"])
@pytest.mark.parametrize("split_map", list(TWO_GPU_MAPS))
def test_split_over_two_gpus_under_cuda_graphs_is_one_gpus_answer(split_map, compiled):
    """use_cuda_graphs on a model split by Accelerate: one captured segment per device, the hand-offs copied
    between replays (with ``compile=True``, segments of compiled layers). fp32: the eager one-GPU tokens and
    logits, generation after generation."""
    from accelerate import dispatch_model

    _, rolling = model_pair(tiny_config(WINDOW, layers=4, heads=8, kv_heads=2, head_dim=64))
    one_gpu = copy.deepcopy(rolling).cuda()
    expected = generate(one_gpu, past_key_values=RollingSlidingWindowCache(config=one_gpu.config))
    split = dispatch_model(copy.deepcopy(rolling), device_map=TWO_GPU_MAPS[split_map])
    hf_rolling_cache.use_cuda_graphs(split, compile=compiled)
    for _ in range(5):
        cache = RollingSlidingWindowCache(config=split.config)
        got = generate(split, past_key_values=cache, prefill_chunk_size=WINDOW)
        assert torch.equal(got.sequences.cpu(), expected.sequences.cpu())
        for ours, theirs in zip(got.scores, expected.scores):
            torch.testing.assert_close(ours.cpu(), theirs.cpu(), rtol=0, atol=1e-4)
        assert got.scores[-1].device == torch.device("cuda:0")  # where Accelerate's hook returns them
    segments = getattr(cache.decode_graph, "segments", None)
    if split_map == "layers_elsewhere":
        assert segments is None
    else:
        assert [str(s.device) for s in segments] == (
            ["cuda:0", "cuda:1"] if split_map == "halves" else ["cuda:0", "cuda:1", "cuda:0"])
    hf_rolling_cache.release_cuda_graphs(split)
    assert "forward" in vars(split)  # Accelerate's hook is back on the instance
    assert hasattr(split, "_hf_hook")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_hybrid_split_over_two_gpus_under_cuda_graphs():
    """Gemma 3 (sliding and global layers) split in two, decoded through graph segments: Transformers' eager
    tokens and logits in fp32."""
    from accelerate import dispatch_model

    reference = build("gemma3", WINDOW, seed=2).cuda()
    expected = generate(reference)
    model = copy.deepcopy(reference).cpu()
    layers = len(model.model.layers)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map |= {f"model.layers.{i}": int(i >= layers // 2) for i in range(layers)}
    split = dispatch_model(model, device_map=device_map)
    hf_rolling_cache.enable(split, prefill_chunk_size=5)
    hf_rolling_cache.use_cuda_graphs(split)
    cache = RollingSlidingWindowCache(config=split.config)
    got = generate(split, past_key_values=cache, prefill_chunk_size=5)
    assert torch.equal(got.sequences.cpu(), expected.sequences.cpu())
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours.cpu(), theirs.cpu(), rtol=0, atol=1e-4)
    # cuda:0, then cuda:1 (a new segment there where the first global layer brings its own rotary tables)
    devices = [str(segment.device) for segment in cache.decode_graph.segments]
    assert devices[0] == "cuda:0" and set(devices[1:]) == {"cuda:1"}, devices


def test_graph_recaptured_without_key_mask_once_every_ring_is_full():
    """A row shorter than the window keeps the key mask in the first capture; after the host's periodic read of
    the counters shows every ring full, the step is captured again without it. Transformers' eager answer, fp32."""
    reference, rolling = model_pair(tiny_config(WINDOW, layers=2))
    reference, rolling = reference.cuda(), rolling.cuda()
    hf_rolling_cache.use_cuda_graphs(rolling)
    options = dict(max_new_tokens=100, do_sample=False, output_scores=True, return_dict_in_generate=True,
                   pad_token_id=0)
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, seed=3))
    cache = RollingSlidingWindowCache(config=rolling.config)
    got = rolling.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **options)
    assert_same(got, reference.generate(input_ids=input_ids, attention_mask=attention_mask, **options))
    assert cache.decode_graph.rings_full


def test_graph_captured_one_column_before_a_global_layer_grows():
    """The capture plans with the columns its warm-up found: at 255 columns (a global layer of 256 slots, no
    max_length) the warm-up's discarded step must not make the capture grow the layer inside the graph."""
    reference = build("gemma3", WINDOW, seed=2).cuda()
    model = copy.deepcopy(reference)
    model.set_attn_implementation("rolling_xformers")
    hf_rolling_cache.use_cuda_graphs(model)
    input_ids, attention_mask = (t.cuda() for t in ragged_batch([255, 200], seed=4))
    options = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                   pad_token_id=0)
    cache = RollingSlidingWindowCache(config=model.config)
    got = model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **options)
    assert_same(got, reference.generate(input_ids=input_ids, attention_mask=attention_mask, **options))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("path", ["eager", "graphs"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_over_two_gpus_matches_itself_under_launch_blocking(dtype, path, tmp_path):
    """20 generations of a split model in one process, each equal to the same path with CUDA_LAUNCH_BLOCKING=1
    (where every launch waits, so no kernel can overtake another)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("split_worker.py")
    answers = {}
    for blocking in ("0", "1"):
        out = tmp_path / f"blocking{blocking}.pt"
        run = subprocess.run([sys.executable, str(worker), dtype, path, "20" if blocking == "0" else "1", str(out)],
                             env={**os.environ, "CUDA_LAUNCH_BLOCKING": blocking}, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"worker failed ({run.returncode}):\n{run.stderr[-8000:]}"
        answers[blocking] = torch.load(out)
    expected = answers["1"][0]
    tolerance = 1e-4 if dtype == "float32" else 1e-2
    for got in answers["0"]:
        assert torch.equal(got["sequences"], expected["sequences"])
        for ours, theirs in zip(got["scores"], expected["scores"]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)
