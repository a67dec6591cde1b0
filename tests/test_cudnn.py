"""cuDNN's fused attention for the compiled prefill (`hf_rolling_cache._cudnn`): the band it is asked for against
the plan's xFormers mask, the ragged offsets against the plan's sequences, when it applies, its refusal; on a GPU
its output against the exact kernel (the compiled prefill of a model by cuDNN against Transformers: in
`test_flex`, beside FlexAttention's)."""

import random
import types

import pytest
import torch

from hf_rolling_cache import _cudnn
from hf_rolling_cache._compiled_prefill import prefill_kernel
from hf_rolling_cache._kernels import dense_attention, exact_kernels
from hf_rolling_cache._plan import build_plan
from tests.test_flex import OnCuda, random_plans, visible

# later chunks where some sequences bring no query (a row of padding in this chunk)
IDLE_PLANS = [
    build_plan(window=7, q_length=5, q_seqlens=[5, 0, 3], seen=[9, 4, 0]),
    build_plan(window=None, q_length=6, q_seqlens=[0, 6], seen=[3, 2], capacity=8),
]
PLANS = random_plans(50, seed=3) + IDLE_PLANS


def ids(plan):
    return f"{plan.phase.name}-w{plan.window}-{plan.q_seqlens}"


@pytest.mark.parametrize("plan", PLANS, ids=ids)
def test_the_band_asked_of_cudnn_is_the_xformers_mask_of_every_prefill_phase(plan):
    """Our reading of cuDNN's documented band (`band_mask`) against the plan's xFormers mask; cuDNN's own reading of
    the bounds we pass is checked on a GPU (`test_cudnn_on_gpu_errs_against_the_exact_kernel_like_xformers`)."""
    assert torch.equal(_cudnn.band_mask(plan.q_seqlens, plan.kv_seqlens, plan.window), visible(plan))


@pytest.mark.parametrize("plan", PLANS, ids=ids)
def test_the_ragged_offsets_frame_each_sequence_of_the_plan(plan):
    """Row b's offsets (divided by a token's elements) are where sequence b's queries and keys start in the packed
    tensors: each of its queries sees keys of its own sequence only, its last query the sequence's last key."""
    heads, kv_heads, head_dim, value_dim = 6, 2, 8, 4
    offsets = _cudnn.ragged_offsets(plan, heads, kv_heads, head_dim, value_dim).long()
    q_starts, k_starts = offsets[0] // (heads * head_dim), offsets[1] // (kv_heads * head_dim)
    assert torch.equal(k_starts, offsets[2] // (kv_heads * value_dim))
    assert torch.equal(q_starts, offsets[3] // (heads * value_dim))
    assert torch.equal(offsets[4, :-1], q_starts.diff()) and torch.equal(offsets[5, :-1], k_starts.diff())
    assert (q_starts[-1], k_starts[-1]) == (plan.num_queries, plan.num_keys)
    seen = visible(plan)
    for b in range(plan.batch_size):
        rows = seen[q_starts[b]:q_starts[b + 1]]
        if len(rows) == 0:
            continue
        assert not rows[:, :k_starts[b]].any() and not rows[:, k_starts[b + 1]:].any()
        assert rows[-1, k_starts[b + 1] - 1]


def test_graph_buckets_are_powers_of_two_from_one_tile_that_hold_the_run():
    for length in [1, 2, 127, 128, 129, 4095, 4096, 4097, 32768, 40000]:
        size = _cudnn.bucket(length)
        assert size >= max(length, 128) and size & (size - 1) == 0 and size < max(2 * length, 256)


class FakeCudnn:
    """Stands in for the cudnn module: its graphs fail to build."""


def test_cudnn_applies_inside_the_compiled_prefill_where_cudnn_frontend_imports(monkeypatch):
    monkeypatch.setattr(_cudnn._cudnn, "_module", FakeCudnn())
    monkeypatch.setattr(_cudnn._cudnn, "refused", set())
    on_cuda = OnCuda()
    assert not _cudnn.applies(on_cuda, None, None)  # outside the compiled prefill
    with prefill_kernel():
        assert _cudnn.applies(on_cuda, None, None) and _cudnn.applies(OnCuda(shape=(1, 4, 8)), None, None)
        assert _cudnn.applies(OnCuda(dtype=torch.float16), None, None)
        assert not _cudnn.applies(torch.zeros(2, 4, 8, dtype=torch.bfloat16), None, None)  # (CPU)
        assert not _cudnn.applies(OnCuda(dtype=torch.float32), None, None)
        assert not _cudnn.applies(OnCuda(requires_grad=True), None, None)
        assert not _cudnn.applies(on_cuda, 50.0, None) and not _cudnn.applies(on_cuda, None, torch.zeros(4))
        with exact_kernels():
            assert not _cudnn.applies(on_cuda, None, None)
        monkeypatch.setattr(_cudnn._cudnn, "_module", False)  # not installed
        assert not _cudnn.applies(on_cuda, None, None)


def test_a_cudnn_that_fails_warns_once_and_leaves_prefill_to_the_next_kernel(monkeypatch, caplog):
    monkeypatch.setattr(_cudnn._cudnn, "_module", FakeCudnn())
    monkeypatch.setattr(_cudnn._cudnn, "refused", set())
    monkeypatch.setattr(_cudnn._cudnn, "_graphs", {})

    def unsupported(shape):
        raise RuntimeError("cudnnGraphNotSupportedError: no engine for this band")

    monkeypatch.setattr(_cudnn, "_build", unsupported)
    plan = build_plan(window=7, q_length=20, q_seqlens=(20,), seen=(0,))
    query = torch.randn(plan.num_queries, 4, 16, dtype=torch.bfloat16)
    keys = values = torch.randn(plan.num_keys, 2, 16, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="hf_rolling_cache._compiled_prefill"):
        assert _cudnn.cudnn_packed(query, keys, values, plan, 0.3) is None
    assert "cuDNN cannot run the prefill here" in caplog.text
    with prefill_kernel():
        assert not _cudnn.applies(OnCuda(dtype=query.dtype, shape=query.shape, device=query.device), None, None)
        assert _cudnn.applies(OnCuda(dtype=torch.float16, shape=query.shape, device=query.device), None, None)

    def out_of_memory(shape):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(_cudnn, "_build", out_of_memory)
    half = query.half()
    with pytest.raises(torch.OutOfMemoryError):  # the caller's to handle, not a refusal
        _cudnn.cudnn_packed(half, keys.half(), values.half(), plan, 0.3)
    assert (torch.float16, 16, half.device) not in _cudnn._cudnn.refused


def test_keys_unlike_the_query_or_offsets_past_int32_go_to_the_next_kernel_without_a_refusal(monkeypatch):
    """cuDNN would read keys and values as the query's dtype and head size: anything else is not handed to it, and
    a chunk whose element offsets overflow int32 is left to the next kernel, without refusing the next chunks."""
    monkeypatch.setattr(_cudnn._cudnn, "_module", FakeCudnn())
    monkeypatch.setattr(_cudnn._cudnn, "refused", set())
    monkeypatch.setattr(_cudnn, "_build", lambda shape: pytest.fail("no graph for inputs cuDNN cannot take"))
    plan = build_plan(window=7, q_length=20, q_seqlens=(20,), seen=(0,))
    query = torch.randn(plan.num_queries, 4, 16, dtype=torch.bfloat16)
    keys = torch.randn(plan.num_keys, 2, 16, dtype=torch.bfloat16)
    three_heads = torch.randn(plan.num_keys, 3, 16, dtype=torch.bfloat16)  # (not a divisor of the query's 4)
    for other_keys, other_values in [(keys.float(), keys), (keys, keys.half()), (keys[..., :8], keys),
                                     (three_heads, three_heads), (keys[:-1], keys)]:
        assert _cudnn.cudnn_packed(query, other_keys, other_values, plan, 0.3) is None
    huge = types.SimpleNamespace(q_seqlens=(600_000,), kv_seqlens=(600_000,), batch_size=1)
    assert _cudnn.ragged_offsets(huge, 32, 8, 128, 128) is None  # 600k x 32 x 128 elements
    assert _cudnn.ragged_offsets(types.SimpleNamespace(q_seqlens=(4096,), kv_seqlens=(8192,)), 32, 8, 128, 128) \
        is not None
    assert not _cudnn._cudnn.refused


needs_cudnn = pytest.mark.skipif(not _cudnn._cudnn.module(), reason="cudnn-frontend is not installed")

# plans of every phase at a model's scale: long chunks over held keys, ragged batches, a global layer
GPU_PLANS = [
    dict(window=4096, q_length=4096, q_seqlens=[4096], seen=[8192]),
    dict(window=4096, q_length=4096, q_seqlens=[4096], seen=[0]),
    dict(window=512, q_length=700, q_seqlens=[300, 1, 700, 129], seen=[5000, 10, 0, 512]),
    dict(window=512, q_length=600, q_seqlens=[600, 0, 37], seen=[600, 90, 2000]),
    dict(window=None, q_length=900, q_seqlens=[900, 13], seen=[1000, 0], capacity=2000),
    dict(window=512, q_length=300, q_seqlens=[300, 0, 40], seen=[0, 0, 0]),  # a first chunk, a row of padding
]


@pytest.mark.gpu
@needs_cudnn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value_dim", [128, 64])
def test_cudnn_on_gpu_errs_against_the_exact_kernel_like_xformers(dtype, value_dim):
    """cuDNN's band over ragged packed sequences against the exact kernel in fp32 on the same inputs: its error as
    small as xFormers' own (values as wide as keys; narrower, as MiMo's), on plans of every phase, random ones
    too."""
    from hf_rolling_cache._kernels import _grouped_xformers

    rng = random.Random(7)
    plans = [build_plan(**options) for options in GPU_PLANS] + random_plans(12, seed=rng.randint(0, 99))
    for plan in plans:
        generator = torch.Generator(device="cuda").manual_seed(3)
        query = torch.randn(plan.num_queries, 32, 128, generator=generator, device="cuda").to(dtype)
        keys = torch.randn(plan.num_keys, 8, 128, generator=generator, device="cuda").to(dtype)
        values = torch.randn(plan.num_keys, 8, value_dim, generator=generator, device="cuda").to(dtype)
        out = _cudnn.cudnn_packed(query, keys, values, plan, 128 ** -0.5)
        assert out is not None and out.shape == (plan.num_queries, 32, value_dim)
        truth = dense_attention(query.float(), keys.float(), values.float(), plan.dense_mask("cuda"), 128 ** -0.5)
        error = (out.float() - truth).abs().max().item()
        if value_dim == 128:  # (xFormers' operators take values as wide as keys)
            reference = (_grouped_xformers(query, keys, values, plan, 128 ** -0.5).float() - truth).abs().max().item()
        else:
            reference = (truth.to(dtype).float() - truth).abs().max().item()  # the output's own rounding
        assert error <= 2 * reference + 1e-3, (plan, error, reference)
    assert not _cudnn._cudnn.refused

