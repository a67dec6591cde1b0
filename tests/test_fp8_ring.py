"""The 8-bit ring (`kv_dtype=torch.float8_e4m3fn`): the quantization's error bound and packing, generation parity
with a plain ring that stores the same rounded keys and values, memory, row operations and crop, the compiled
decode write, the CUDA kernel's glue (against a stand-in kernel), and refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache._fp8 import FP8, FP8_MAX, SCALE_MAX, SCALE_MIN, Fp8KVLayer, dequantize, quantize, write_fp8_tokens
from hf_rolling_cache._kernels import attend_ring, attend_ring_fp8, dense_attention
from hf_rolling_cache._layers import KVLayer
from hf_rolling_cache._plan import build_plan
from hf_rolling_cache._compiled import CompiledLayers
from tests.conftest import model_pair, ragged_batch, tiny_config
from tests.families import build

FP16_TINY = torch.finfo(torch.float16).tiny  # 2**-14


# --- the quantization ------------------------------------------------------------------------------------------------
def e4m3_step(codes: torch.Tensor) -> torch.Tensor:
    """The distance between neighbouring e4m3 values around ``|codes|``: 3 mantissa bits above 2**-6, a fixed
    2**-9 among the subnormals below."""
    exponent = torch.floor(torch.log2(codes.abs().clamp(min=2.0**-6)))
    return torch.exp2(exponent - 3)


def test_round_trip_error_is_within_half_an_e4m3_step_at_the_rows_scale():
    torch.manual_seed(0)
    magnitudes = torch.tensor([1e-7, 1e-3, 0.02, 1.0, 30.0, 1000.0, 6e4]).view(-1, 1, 1)
    states = torch.randn(7, 3, 64) * magnitudes  # rows whose scales hit the float16 floor, the middle, the ceiling
    states[:, :, 0] *= 8  # one outlier a row: the others sit far below the row's amax
    codes, scale_shift = quantize(states)
    assert codes.dtype == FP8 and codes.shape == states.shape
    assert scale_shift.dtype == torch.float16 and scale_shift.shape == (*states.shape[:-1], 2)
    scale = scale_shift[..., :1].float()
    assert torch.all(scale_shift[..., 1] == 0) and torch.all((scale >= SCALE_MIN) & (scale <= SCALE_MAX))
    back = dequantize(codes, scale_shift, torch.float32)
    in_range = states.abs().amax(-1, keepdim=True) <= FP8_MAX * SCALE_MAX  # beyond it the ring saturates
    # rounding to e4m3 at the stored scale, then the float16 product (half an ulp: 2**-11 relative, 2**-25 absolute)
    bound = e4m3_step(states / scale) / 2 * scale + back.abs() * 2.0**-11 + 2.0**-25
    error = (back - states).abs()
    assert in_range[:6].all() and not in_range[6].any()
    within = (error / bound)[in_range.expand_as(error)]
    assert within.max() <= 1 and within.max() > 0.5  # the bound holds, and is not loose
    assert torch.all(torch.isfinite(back))  # a row past float16's range saturates instead of overflowing


def test_zero_rows_stay_zero_and_scales_pack_as_xformers_reads_them():
    states = torch.randn(2, 5, 3, 8)
    states[0, 1] = 0  # every head of one token
    states[1, 2, 1] = 0  # one head of another
    codes, scale_shift = quantize(states)
    back = dequantize(codes, scale_shift, torch.float32)
    assert torch.all(back[0, 1] == 0) and torch.all(back[1, 2, 1] == 0)
    assert torch.all(scale_shift[0, 1, :, 0] == FP16_TINY)  # clamped away from 0: nothing divides by 0
    packed = scale_shift.view(torch.int32).squeeze(-1)  # [2, 5, 3]: one int32 per token and kv head
    assert packed.shape == states.shape[:-1]
    low, high = (packed & 0xFFFF).to(torch.int16), (packed >> 16).to(torch.int16)  # xFormers: scale low, shift high
    assert torch.equal(low.view(torch.float16), scale_shift[..., 0])
    assert torch.equal(high.view(torch.float16), scale_shift[..., 1])
    assert codes.view(torch.int32).shape == (2, 5, 3, 2)  # four codes an int32
    assert torch.isfinite(torch.tensor(FP8_MAX * SCALE_MAX, dtype=torch.float16))
    half = dict(dtype=torch.float16)
    above = torch.nextafter(torch.tensor(SCALE_MAX, **half), torch.tensor(200.0, **half))  # the next float16 up
    assert torch.isinf(torch.tensor(FP8_MAX, dtype=torch.float16) * above)  # SCALE_MAX is the largest safe scale


# --- generation parity with a fake-quantized plain ring ----------------------------------------------------------
def rounded(states: torch.Tensor) -> torch.Tensor:
    """What the 8-bit ring gives back for ``states``, in their dtype."""
    return dequantize(*quantize(states), states.dtype)


@pytest.fixture
def rounding_plain_rings(monkeypatch):
    """Plain layers that store each key and value rounded as the 8-bit ring would: the reference."""
    write_decode, write = KVLayer.write_decode, KVLayer.write

    def rounded_decode(self, keys, values, slots, keep):
        write_decode(self, rounded(keys), rounded(values), slots, keep)

    def rounded_write(self, keys, values, indices):
        write(self, rounded(keys), rounded(values), indices)

    monkeypatch.setattr(KVLayer, "write_decode", rounded_decode)
    monkeypatch.setattr(KVLayer, "write", rounded_write)


def rolling_model(family: str, window: int):
    if family == "mistral":
        return model_pair(tiny_config(window))[1]
    model = build(family, window)
    model.set_attn_implementation("rolling_xformers")
    return model


def generate(model, lengths, new_tokens, chunk, kv_dtype):
    input_ids, attention_mask = ragged_batch(lengths)
    cache = RollingSlidingWindowCache(config=model.config, kv_dtype=kv_dtype)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=new_tokens,
        do_sample=False, prefill_chunk_size=chunk, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
    )
    return out, cache


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma2", "mimo_v2_flash"])  # + global layers, caps, sinks
@pytest.mark.parametrize("chunk", [None, 3])  # one prefill that wraps the ring; chunks that attend over it
def test_fp8_ring_generates_what_a_ring_of_rounded_keys_and_values_does(family, chunk, rounding_plain_rings):
    window, lengths, new_tokens = 4, [9, 2, 6], 10  # ragged, left padded; decode runs past the window
    model = rolling_model(family, window)
    got, fp8_cache = generate(model, lengths, new_tokens, chunk, FP8)
    expected, plain_cache = generate(model, lengths, new_tokens, chunk, None)
    assert all(isinstance(layer, Fp8KVLayer) for layer in fp8_cache.layers)
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(step_got, step_expected, rtol=0, atol=1e-5)
    for fp8_layer, plain_layer in zip(fp8_cache.layers, plain_cache.layers):
        assert torch.equal(fp8_layer.keys, plain_layer.keys) and torch.equal(fp8_layer.values, plain_layer.values)


def test_the_rounding_is_not_vacuous():
    """The same generation with unrounded keys and values gives other logits: the parity above tests something."""
    model = rolling_model("mistral", 4)
    got, _ = generate(model, [9, 2, 6], 4, 3, FP8)
    unrounded, _ = generate(model, [9, 2, 6], 4, 3, None)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, unrounded.scores)) > 1e-4


# --- memory ----------------------------------------------------------------------------------------------------------
def test_memory_is_d_plus_4_over_2d_of_a_bf16_ring_and_stays_flat():
    window, head_dim, lengths = 4, 16, [7, 3]
    model = model_pair(tiny_config(window, head_dim=head_dim))[1].to(torch.bfloat16)
    input_ids, attention_mask = ragged_batch(lengths)
    sizes = {}
    for kv_dtype in (None, FP8):
        cache = RollingSlidingWindowCache(config=model.config, kv_dtype=kv_dtype)
        seen = set()
        handle = model.model.register_forward_hook(lambda *_: seen.add(cache.memory_bytes()))
        try:
            model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                           max_new_tokens=6 * window, do_sample=False, pad_token_id=0, prefill_chunk_size=2)
        finally:
            handle.remove()
        assert len(seen) == 1  # the same bytes after every forward, however long the generation
        sizes[kv_dtype] = seen.pop()
    per_token_head = {None: 2 * head_dim, FP8: head_dim + 2 * 2}  # bf16 values; e4m3 codes + a float16 pair
    slots = len(lengths) * window * model.config.num_key_value_heads * 2 * model.config.num_hidden_layers  # K and V
    assert sizes == {kind: slots * size for kind, size in per_token_head.items()}
    assert sizes[FP8] / sizes[None] == (head_dim + 4) / (2 * head_dim)
    # what `hf-rolling-cache estimate --dtype fp8` predicts from the shape, before anything is allocated
    from hf_rolling_cache.tools import estimate

    shape = estimate.KVShape.from_config(model.config)
    predicted = estimate.rolling_cache_bytes(shape, len(lengths), window, estimate.dtype_bytes("fp8"),
                                             scale_bytes=estimate.SCALE_BYTES["fp8"])
    assert predicted == sizes[FP8]


# --- row operations, crop, reset ----------------------------------------------------------------------------------
def test_row_operations_move_codes_and_scales_together():
    model = rolling_model("mistral", 4)
    _, cache = generate(model, [6, 2, 3], 2, None, FP8)
    layer = cache.layers[1]
    keys, values, seen = layer.keys, layer.values, cache.seen
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert cache.seen == [seen[2], seen[0], seen[0]]
    assert torch.equal(layer.keys, keys[[2, 0, 0]]) and torch.equal(layer.values, values[[2, 0, 0]])
    cache.batch_select_indices(torch.tensor([1]))
    cache.batch_repeat_interleave(2)
    assert cache.seen == [seen[0]] * 2
    assert torch.equal(layer.keys, keys[[0, 0]]) and torch.equal(layer.values, values[[0, 0]])
    assert all(tensor.shape[0] == 2 for tensor in layer.storage())
    cache.reset()
    assert all(torch.count_nonzero(tensor.view(torch.uint8)) == 0 for tensor in layer.storage())


def test_crop_then_continue_as_the_rounding_plain_ring(rounding_plain_rings):
    """Roll back and continue both caches the same way: same logits, same dequantized contents."""
    model = rolling_model("mistral", 4)
    input_ids, attention_mask = ragged_batch([3, 2], seed=1)
    follow = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for kv_dtype in (None, FP8):
        cache = RollingSlidingWindowCache(config=model.config, kv_dtype=kv_dtype, slack=2)
        mask = attention_mask
        logits = [model(input_ids=input_ids, attention_mask=mask, past_key_values=cache).logits]
        for step in range(follow.shape[1]):  # decode past the window, then roll back 3 (slack + 1) and redo
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            token = follow[:, step : step + 1]
            logits.append(model(input_ids=token, attention_mask=mask, past_key_values=cache).logits)
            if step == 3:
                cache.crop(-3)
                mask = mask[:, :-3]
        outputs[kv_dtype] = torch.cat(logits, dim=1), cache
    (expected, plain), (got, fp8) = outputs[None], outputs[FP8]
    assert fp8.seen == plain.seen
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for fp8_layer, plain_layer in zip(fp8.layers, plain.layers):
        assert torch.equal(fp8_layer.keys, plain_layer.keys)


# --- the decode write, compiled --------------------------------------------------------------------------------------
def compiled_write_equals_eager(layer, new, slots, keep, backend: str) -> None:
    """Write ``new`` into ``layer`` with its compiled decode writer (as `use_cuda_graphs(compile=True)` makes it), and
    check the codes and scales bit for bit against the eager write into a copy of the storage."""
    eager = [tensor.clone() for tensor in layer._flat_codes()]
    write_fp8_tokens(*eager, *new, slots, keep)
    writer = CompiledLayers(model_pair(tiny_config(2, layers=1))[1], backend=backend)._compiled_writer(layer)
    writer(*layer._flat_codes(), *new, slots, keep)
    for got, want in zip(layer._flat_codes(), eager):
        assert torch.equal(got, want)


def test_compiled_fp8_decode_write_matches_eager_and_keeps_padded_rows():
    torch.manual_seed(0)
    batch, window, heads, head_dim = 3, 4, 2, 8
    cache = RollingSlidingWindowCache(window=window, num_layers=1, kv_dtype=FP8)
    layer = cache.layers[0]
    layer.lazy_initialization(torch.randn(batch, heads, 1, head_dim), torch.randn(batch, heads, 1, head_dim))
    layer.write_decode(*(torch.randn(batch, heads, head_dim) for _ in range(2)), torch.tensor([0, 4, 8]), None)
    new = [torch.randn(batch, heads, head_dim) for _ in range(2)]
    slots = torch.tensor([0, window + 1, 2 * window])  # row 1 writes a fresh slot, but it is padding this step
    keep = torch.tensor([True, False, True]).view(-1, 1, 1)
    before = [tensor.clone() for tensor in layer.storage()]
    compiled_write_equals_eager(layer, new, slots, keep, "aot_eager")
    after = layer.storage()
    for old, now in zip(before, after):
        assert torch.equal(old[1].view(torch.uint8), now[1].view(torch.uint8))  # the padded row changed nothing
    key_codes, key_scales = quantize(new[0][0])
    assert torch.equal(after[0][0, 0].view(torch.uint8), key_codes.view(torch.uint8))
    assert torch.equal(after[2][0, 0], key_scales)


def test_inductor_compiled_fp8_decode_write_stores_eagers_bits():
    """Inductor (what use_cuda_graphs(compile=True) uses), not a stand-in backend: left alone it would drop the
    scale's float16 round trip inside its fused kernel and divide by the unrounded scale, so some codes (about one
    in a thousand) would land one e4m3 step away from those `quantize` gives for the stored scale."""
    torch.manual_seed(1)
    batch, window, heads, head_dim = 32, 2, 8, 128
    cache = RollingSlidingWindowCache(window=window, num_layers=1, kv_dtype=FP8)
    layer = cache.layers[0]
    layer.lazy_initialization(torch.randn(batch, heads, 1, head_dim), torch.randn(batch, heads, 1, head_dim))
    new = [torch.randn(batch, heads, head_dim) * 3 for _ in range(2)]
    slots = torch.arange(batch) * window
    compiled_write_equals_eager(layer, new, slots, None, "inductor")


# --- the CUDA kernel's glue, against a stand-in for xFormers' split-K kernel --------------------------------------
def split_k_stand_in(inputs, needs_gradient=False):
    """What xFormers documents its split-K kernel computes for fp8 K/V: unpack four e4m3 codes per int32 and a
    (scale, shift) float16 pair per int32, dequantize in float16, attend with the mask. ``[1, B, G, H, K]`` in."""
    query = inputs.query[0]  # [B, G, H, K]
    batch, kv_heads, group, head_dim = query.shape

    def unpacked(codes, scale_shift):  # [1, B * C, G, H(stride 0), K // 4] int32 -> [B * C, G, K]
        codes = codes[0, :, :, 0].contiguous().view(FP8)
        scale_shift = scale_shift[0, :, :, 0]
        halves = torch.stack([(scale_shift & 0xFFFF), (scale_shift >> 16) & 0xFFFF], dim=-1).to(torch.int16)
        return dequantize(codes, halves.view(torch.float16), query.dtype)

    keys = unpacked(inputs.key, inputs.k_fp8_scale_shift)
    values = unpacked(inputs.value, inputs.v_fp8_scale_shift)
    bias = inputs.attn_bias.materialize((batch, keys.shape[0]), dtype=torch.float32)
    out = dense_attention(query.reshape(batch, kv_heads * group, head_dim), keys, values, bias, inputs.scale)
    return out.view(1, batch, kv_heads, group, -1), None


@pytest.mark.parametrize("window,seen", [(4, [9, 2, 5]), (None, [9, 2, 5])])  # a ring; a global layer's prefix
def test_kernel_glue_hands_xformers_the_ring_it_documents(window, seen, monkeypatch):
    from xformers.ops.fmha import triton_splitk

    from hf_rolling_cache import _kernels

    monkeypatch.setattr(triton_splitk.FwOp, "apply", split_k_stand_in)
    monkeypatch.setattr(_kernels._fp8_decode, "refusals", lambda inputs: [])
    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim = len(seen), 4, 2, 16
    capacity = window or 16  # a global layer's storage is longer than what it holds
    cache = RollingSlidingWindowCache(window=window or 4, num_layers=1, kv_dtype=FP8)
    layer = Fp8KVLayer(window, cache.ledger.counters, capacity)
    states = [torch.randn(batch, kv_heads, capacity, head_dim) for _ in range(2)]
    layer.lazy_initialization(*states)
    layer.keys, layer.values = states
    plan = build_plan(window=window, q_length=1, q_seqlens=[1] * batch, seen=seen, capacity=capacity)
    query = torch.randn(batch, heads, 1, head_dim)
    got = attend_ring_fp8(query, layer.attended_fp8(), plan, 0.25)
    keys, values = layer.attended(plan.key_span)
    expected = attend_ring(query, keys, values, plan.key_bias(query.device, query.dtype), 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.bfloat16, torch.float8_e5m2, "fp8"])
def test_other_kv_dtypes_are_refused_naming_the_accepted_ones(kv_dtype):
    model = rolling_model("mistral", 4)
    with pytest.raises(ValueError, match=r"kv_dtype=None .* kv_dtype=torch.float8_e4m3fn"):
        RollingSlidingWindowCache(config=model.config, kv_dtype=kv_dtype)
    with pytest.raises(ValueError, match=r"kv_dtype=None .* kv_dtype=torch.float8_e4m3fn"):
        hf_rolling_cache.enable(copy.deepcopy(model), kv_dtype=kv_dtype)


def test_head_dims_not_divisible_by_4_are_refused_before_anything_is_stored():
    model = model_pair(tiny_config(4, head_dim=6))[1]
    cache = RollingSlidingWindowCache(config=model.config, kv_dtype=FP8)
    input_ids, attention_mask = ragged_batch([5])
    with pytest.raises(ValueError, match="divisible by 4"):
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    assert not any(layer.is_initialized for layer in cache.layers)


def test_enable_gives_generate_fp8_caches():
    model = rolling_model("mistral", 4)
    input_ids, attention_mask = ragged_batch([9, 2])
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                   pad_token_id=0)
    expected = model.generate(
        **options, past_key_values=RollingSlidingWindowCache(config=model.config, kv_dtype=FP8), prefill_chunk_size=4
    )
    hf_rolling_cache.enable(model, kv_dtype=FP8)  # chunks of the window (4) by default
    try:
        got = model.generate(**options, return_dict_in_generate=True)
    finally:
        hf_rolling_cache.disable(model)
    assert got.past_key_values.kv_dtype is FP8
    assert torch.equal(got.sequences, expected)


# --- on CUDA: xFormers' split-K kernel reads the ring --------------------------------------------------------------
def cuda_generate(model, kv_dtype=FP8, **options):
    input_ids, attention_mask = (t.cuda() for t in ragged_batch([37, 2, 19, 64], vocab=1000, seed=3))
    cache = RollingSlidingWindowCache(config=model.config, kv_dtype=kv_dtype)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=24,
        do_sample=False, prefill_chunk_size=16, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
        **options,
    )
    return out, cache


@pytest.fixture
def split_k_calls(monkeypatch):
    """How many times xFormers' split-K kernel was launched from Python (a graph's replays launch it without)."""
    from xformers.ops.fmha import triton_splitk

    calls = []
    apply = triton_splitk.FwOp.apply.__func__

    def counted(cls, inputs, needs_gradient):
        calls.append(type(inputs).__name__)
        return apply(cls, inputs, needs_gradient)

    monkeypatch.setattr(triton_splitk.FwOp, "apply", classmethod(counted))
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("window", [64, None], ids=["ring", "global"])
def test_split_k_kernel_reads_the_fp8_ring_eagerly_and_captured(window, split_k_calls):
    """bf16 (the kernel takes float16/bfloat16 queries), 8 query heads over 2 kv heads, D=128: xFormers' kernel over
    the packed ring gives what SDPA gives over the dequantized ring, for a step planned on the host, and for one
    planned on the device and captured in a CUDA graph, replayed with other key lengths written into its tensors."""
    from hf_rolling_cache._plan import DeviceDecodePlan

    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim, capacity = 3, 8, 2, 128, 64
    cache = RollingSlidingWindowCache(window=64, num_layers=1, kv_dtype=FP8)
    layer = Fp8KVLayer(window, cache.ledger.counters, capacity)
    states = [torch.randn(batch, kv_heads, capacity, head_dim, device="cuda", dtype=torch.bfloat16) for _ in "kv"]
    layer.lazy_initialization(*states)
    layer.keys, layer.values = states
    query = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    scaling = head_dim**-0.5

    def expected(seen):
        plan = build_plan(window=window, q_length=1, q_seqlens=[1] * batch, seen=seen, capacity=capacity)
        keys, values = layer.attended(plan.key_span)
        return plan, attend_ring(query, keys, values, plan.key_bias(query.device, query.dtype), scaling)

    plan, reference = expected([63, 5, 40])
    got = attend_ring_fp8(query, layer.attended_fp8(), plan, scaling)
    assert split_k_calls == ["InputsFp8"]
    torch.testing.assert_close(got, reference, rtol=2e-2, atol=2e-2)

    seen = torch.tensor([63, 5, 40], device="cuda")
    real = torch.ones(batch, dtype=torch.long, device="cuda")

    def device_plan():  # a new plan per step, as the ledger makes one per forward
        return DeviceDecodePlan(window=window, capacity=capacity, seen=seen, real=real)

    attend_ring_fp8(query, layer.attended_fp8(), device_plan(), scaling)  # eager first, as a capture's warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend_ring_fp8(query, layer.attended_fp8(), device_plan(), scaling)
    for lengths in ([63, 5, 40], [2, 0, 63], [17, 33, 1]):
        seen.copy_(torch.tensor(lengths))
        graph.replay()
        torch.testing.assert_close(out, expected(lengths)[1], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["eager", "graphs", "compiled"])
def test_generate_with_an_fp8_ring_on_cuda_reads_it_with_the_split_k_kernel(path, split_k_calls):
    """bf16 Mistral with grouped heads (W=16, a ragged batch in chunks, decode past the window): generate takes the
    kernel path (eagerly, and in the captured step) and its logits stay within bf16 noise of the path that
    dequantizes the ring first (`exact_kernels`), compared up to the first step whose greedy token differs."""
    from hf_rolling_cache import _kernels

    config = tiny_config(16, kv_heads=2, heads=8, head_dim=64, layers=4, vocab=1000)
    config.hidden_size, config.intermediate_size = 256, 512
    model = model_pair(config)[1].to("cuda", torch.bfloat16)
    with _kernels.exact_kernels():
        expected, _ = cuda_generate(model)
    assert not split_k_calls
    if path != "eager":
        hf_rolling_cache.use_cuda_graphs(model, compile=path == "compiled")
    got, cache = cuda_generate(model)
    assert split_k_calls and set(split_k_calls) == {"InputsFp8"}
    if path != "eager":
        assert getattr(cache.decode_graph, "segments", None) is not None  # replayed, not eager steps
        hf_rolling_cache.release_cuda_graphs(model)
    new = got.sequences.shape[1] - len(got.scores)
    for step, (ours, theirs) in enumerate(zip(got.scores, expected.scores, strict=True)):
        scale = theirs.float().abs().max().item()
        assert (ours.float() - theirs.float()).abs().max().item() <= 0.05 * scale, f"step {step}"
        if not torch.equal(got.sequences[:, new + step], expected.sequences[:, new + step]):
            break  # from here on the two read different tokens
