"""FlexAttention for the compiled prefill (`hf_rolling_cache._flex`): each query's key range against the plan's
xFormers mask, the tiles it visits, its output against the exact kernel, and the compiled prefill of a whole
model against Transformers (on a GPU, by cuDNN too, `_cudnn`)."""

import random
import warnings

import pytest
import torch

from hf_rolling_cache import _cudnn, _flex
from hf_rolling_cache._compiled_prefill import prefill_kernel
from hf_rolling_cache._compiled import CompiledLayers
from hf_rolling_cache._kernels import dense_attention, exact_kernels
from hf_rolling_cache._plan import build_plan
from tests.conftest import OnCuda, model_pair, ragged_batch, tiny_config


def random_plans(count: int, seed: int = 0):
    """Prefill plans of every phase: one or several sequences, first chunks and later ones (held keys), rings
    and global layers, windows below and above a 128-token tile."""
    rng = random.Random(seed)
    plans = []
    while len(plans) < count:
        window = rng.choice([None, 1, 3, 7, 128, 130, 300])
        batch = rng.randint(1, 3)
        q_seqlens = [rng.randint(1, 300) for _ in range(batch)]
        seen = [0] * batch if rng.random() < 0.4 else [rng.choice([0, rng.randint(1, 600)]) for _ in range(batch)]
        capacity = None if window is not None else max(seen) + max(q_seqlens)
        plans.append(build_plan(window=window, q_length=max(q_seqlens), q_seqlens=q_seqlens, seen=seen,
                                capacity=capacity))
    return plans


def visible(plan) -> torch.Tensor:
    """``[T, S]`` True where the plan's xFormers mask lets query t see key s."""
    return plan.dense_mask() == 0


@pytest.mark.parametrize("plan", random_plans(60), ids=lambda p: f"{p.phase.name}-w{p.window}-{p.q_seqlens}")
def test_each_query_sees_one_range_of_keys_exactly_as_the_xformers_mask(plan):
    first, last = _flex.key_ranges(plan)
    keys = torch.arange(plan.num_keys)
    ours = (keys[None] >= first[:, None]) & (keys[None] <= last[:, None])
    assert torch.equal(ours, visible(plan))


def listed_tiles(counts: torch.Tensor, indices: torch.Tensor, key_tiles: int) -> torch.Tensor:
    rows = counts.shape[-1]
    tiles = torch.zeros(rows, key_tiles, dtype=torch.bool)
    for row in range(rows):
        tiles[row, indices[0, 0, row, : counts[0, 0, row]].long()] = True
    return tiles


@pytest.mark.parametrize("plan", random_plans(30, seed=1), ids=lambda p: f"{p.phase.name}-w{p.window}-{p.q_seqlens}")
def test_the_block_mask_visits_exactly_the_tiles_with_a_visible_key_and_skips_the_mask_only_where_all_are(plan):
    mask, _ = _flex.block_mask(plan, torch.device("cpu"))
    tile = _flex.BLOCK
    rows, key_tiles = -(-plan.num_queries // tile), -(-plan.num_keys // tile)
    partial = listed_tiles(mask.kv_num_blocks, mask.kv_indices, key_tiles)
    full = listed_tiles(mask.full_kv_num_blocks, mask.full_kv_indices, key_tiles)
    seen = torch.zeros(rows * tile, key_tiles * tile, dtype=torch.bool)
    seen[: plan.num_queries, : plan.num_keys] = visible(plan)
    per_tile = seen.view(rows, tile, key_tiles, tile)
    assert not (partial & full).any()
    assert torch.equal(partial | full, per_tile.any(dim=(1, 3)))  # every tile with a visible key, and no other
    assert torch.equal(full, per_tile.all(dim=(1, 3)))  # no mask only where every pair is visible
    assert mask.seq_lengths == (plan.num_queries, plan.num_keys)


# Plans with many 128-token tiles, most of them inside the window (no mask), as a 7B model's 4096-token chunks
MULTI_TILE_PLANS = [
    dict(window=300, q_length=700, q_seqlens=[700], seen=[0]),
    dict(window=1000, q_length=600, q_seqlens=[600, 257], seen=[900, 0]),
    dict(window=513, q_length=640, q_seqlens=[640, 3, 500], seen=[513, 700, 1]),
    dict(window=None, q_length=400, q_seqlens=[400, 130], seen=[500, 0], capacity=1000),
]


@pytest.mark.parametrize("seed", [0, 1])
def test_flex_attention_over_the_block_mask_equals_the_exact_kernel(seed):
    """Compiled FlexAttention (on CPU: inductor's C++ kernel) on plans of every phase, grouped query heads, and on
    plans whose chunks span many tiles without a mask."""
    plans = random_plans(4, seed=10 + seed) + [build_plan(**options) for options in MULTI_TILE_PLANS[seed::2]]
    for plan in plans:
        generator = torch.Generator().manual_seed(seed)
        query = torch.randn(plan.num_queries, 4, 16, generator=generator)
        keys, values = (torch.randn(plan.num_keys, 2, 16, generator=generator) for _ in range(2))
        out = _flex.flex_packed(query, keys, values, plan, 0.3)
        assert out is not None and out.is_contiguous()
        torch.testing.assert_close(out, dense_attention(query, keys, values, plan.dense_mask(), 0.3),
                                   rtol=0, atol=1e-5)
    assert sum(int(_flex.block_mask(plan, torch.device("cpu"))[0].full_kv_num_blocks.sum()) for plan in plans) > 10


def test_a_flex_attention_that_fails_warns_once_and_leaves_prefill_to_the_other_kernels(monkeypatch, caplog):
    plan = build_plan(window=7, q_length=200, q_seqlens=(200,), seen=(0,))
    monkeypatch.setattr(_flex._flex, "refused", set())
    query = torch.randn(plan.num_queries, 4, 16, dtype=torch.bfloat16)

    def broken():
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(_flex._flex, "attention", broken)
    keys = values = torch.randn(plan.num_keys, 2, 16, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="hf_rolling_cache._compiled_prefill"):
        assert _flex.flex_packed(query, keys, values, plan, 0.3) is None
    assert "FlexAttention cannot run the prefill here" in caplog.text
    with prefill_kernel():
        refused = OnCuda(dtype=query.dtype, shape=query.shape, device=query.device)
        assert not _flex.applies(refused, None, None)  # these inputs (as if on a GPU): refused from now on
        assert _flex.applies(OnCuda(dtype=torch.float16, shape=query.shape, device=query.device), None, None)


def test_flex_applies_inside_the_compiled_prefill_only_on_cuda_in_half_precision_without_caps_or_sinks():
    query = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
    on_cuda = OnCuda()
    assert not _flex.applies(on_cuda, None, None)  # outside the compiled prefill
    with prefill_kernel():
        assert not _flex.applies(query, None, None)  # (CPU)
        assert _flex.applies(on_cuda, None, None) and _flex.applies(OnCuda(dtype=torch.float16), None, None)
        assert not _flex.applies(OnCuda(dtype=torch.float32), None, None)
        assert not _flex.applies(OnCuda(requires_grad=True), None, None)  # (its kernel gets detached tensors)
        assert not _flex.applies(OnCuda(shape=(127, 4, 8)), None, None)  # under one tile of queries
        assert not _flex.applies(on_cuda, 50.0, None) and not _flex.applies(on_cuda, None, torch.zeros(4))
        with exact_kernels():
            assert not _flex.applies(on_cuda, None, None)
    assert not _flex.applies(on_cuda, None, None)


def test_compile_prefill_needs_compile_and_switches_like_compile():
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs
    from hf_rolling_cache.graphs import _COMPILED

    _, model = model_pair(tiny_config(5))
    with pytest.raises(ValueError, match="compile=True too"):
        use_cuda_graphs(model, compile_prefill=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no CUDA here: every decode step eager)
        use_cuda_graphs(model, compile=True)
    try:
        first = getattr(model, _COMPILED)
        assert not first.prefill
        use_cuda_graphs(model, compile=True)
        assert getattr(model, _COMPILED) is first  # already on, as asked
        use_cuda_graphs(model, compile=True, compile_prefill=True)
        assert getattr(model, _COMPILED) is not first and getattr(model, _COMPILED).prefill
    finally:
        release_cuda_graphs(model)


def test_the_compiled_prefill_is_for_inference_only(monkeypatch):
    """With gradients on, a prefill forward runs the eager layers and kernels, which backpropagate."""
    from types import SimpleNamespace

    from hf_rolling_cache import RollingSlidingWindowCache, graphs

    monkeypatch.setattr(graphs.torch.cuda, "is_current_stream_capturing", lambda: False)  # (no CUDA here)
    cache = RollingSlidingWindowCache(config=tiny_config(5))
    placement = SimpleNamespace(offloaded=False, split=False)
    compiled = SimpleNamespace(prefill=True, sharded=False)
    kwargs = dict(input_ids=OnCuda(shape=(1, 6)))
    with torch.no_grad():
        assert graphs._compiled_prefill(placement, cache, kwargs, compiled)
        assert not graphs._compiled_prefill(placement, cache, kwargs, SimpleNamespace(prefill=False, sharded=False))
    with torch.enable_grad():
        assert not graphs._compiled_prefill(placement, cache, kwargs, compiled)


@torch.no_grad()
def test_the_compiled_prefill_gives_transformers_logits_and_puts_every_module_back(flex_on_cpu, fresh_dynamo):
    """A ragged batch's prompt in chunks (first and later chunks, left padding) through the layers compiled with
    dynamic shapes and FlexAttention, then decode steps eagerly: Transformers' logits at every step."""
    from hf_rolling_cache import RollingSlidingWindowCache

    reference, rolling = model_pair(tiny_config(5, layers=2))
    input_ids, attention_mask = ragged_batch([9, 3, 12], vocab=97, seed=2)
    layers = CompiledLayers(rolling)
    before = [dict(vars(m)) for m in layers.modules]
    cache = RollingSlidingWindowCache(config=rolling.config)
    ours, theirs = [], []
    width = input_ids.shape[1]
    for start in range(0, width, 4):  # chunks of 4 columns: 3 prefill forwards of different shapes
        end = min(width, start + 4)
        with layers.prefill_swapped_in():
            out = rolling(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                          past_key_values=cache)
        ours.append(out.logits.float())
    theirs.append(reference(input_ids=input_ids, attention_mask=attention_mask).logits.float())
    ours = torch.cat(ours, dim=1)
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[0][real], rtol=0, atol=1e-4)
    assert len(flex_on_cpu) == 3 * 2  # every prefill forward, every layer
    assert [dict(vars(m)) for m in layers.modules] == before
    assert all(type(m.self_attn.layer_idx) is int for m in rolling.model.layers)
    # the cache it filled decodes on as Transformers does
    column = torch.tensor([[5], [6], [7]])
    attention_mask = torch.cat([attention_mask, torch.ones_like(column)], dim=1)
    step = rolling(input_ids=column, attention_mask=attention_mask, past_key_values=cache).logits[:, -1]
    full = reference(input_ids=torch.cat([input_ids, column], dim=1), attention_mask=attention_mask).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma3", "mimo_v2_flash"])
def test_the_compiled_prefill_of_hybrid_models_gives_transformers_logits(name, flex_on_cpu, fresh_dynamo):
    """Sliding and global layers in one model (Gemma 3: q/k norms, rope per layer kind; MiMo-V2-Flash: values
    narrower than keys, sinks on its sliding layers only, which keep their kernel): a ragged prompt in chunks
    through the compiled prefill gives Transformers' eager logits."""
    from hf_rolling_cache import RollingSlidingWindowCache
    from tests.families import pair

    reference, rolling = pair(name, window=5, seed=1)
    input_ids, attention_mask = ragged_batch([13, 2, 9], vocab=97, seed=4)
    layers, cache, ours = CompiledLayers(rolling), RollingSlidingWindowCache(config=rolling.config), []
    for start in range(0, input_ids.shape[1], 4):
        end = min(input_ids.shape[1], start + 4)
        with layers.prefill_swapped_in():
            ours.append(rolling(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                                past_key_values=cache).logits.float())
    theirs = reference(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    real = attention_mask.bool()
    torch.testing.assert_close(torch.cat(ours, dim=1)[real], theirs[real], rtol=0, atol=1e-4)
    assert flex_on_cpu  # (the global layers' at least)


PROMPTS = [300, 2, 190, 257]  # ragged, several 128-token tiles, longer than the window (128)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, chunk", [("flex", None), ("flex", 128), ("cudnn", None), ("cudnn", 64)])
def test_compiled_prefill_on_gpu_in_bf16_errs_against_fp32_like_transformers_sdpa(kernel, chunk, monkeypatch):
    """``use_cuda_graphs(compile=True, compile_prefill=True)`` on CUDA: every prefill forward (a ragged, left-padded
    batch, whole or in chunks) runs the compiled layers and the kernel under test (counted: FlexAttention, in
    chunks of at least its 128-token tile; cuDNN, where cudnn-frontend is installed, in short chunks too); the
    logits of the prompt and of later steps err against Transformers' fp32 eager path as little as Transformers'
    own bf16 sdpa path does."""
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs
    from tests.test_gpu import gpu_model, references, rolling_cache, teacher_forced

    module, switch = {"flex": (_flex, _flex._flex), "cudnn": (_cudnn, _cudnn._cudnn)}[kernel]
    if kernel == "cudnn" and not _cudnn._cudnn.module():
        pytest.skip("cudnn-frontend is not installed")
    calls = []
    packed = getattr(module, f"{kernel}_packed")
    monkeypatch.setattr(f"hf_rolling_cache.attention.{kernel}_packed", lambda *a: calls.append(1) or packed(*a))
    monkeypatch.setattr(_cudnn._cudnn, "enabled", kernel == "cudnn")  # (cuDNN comes first where installed)
    continuation = torch.randint(1, 1000, (len(PROMPTS), 20), generator=torch.Generator().manual_seed(5))
    model = gpu_model(torch.bfloat16, window=128, layers=2)
    model.set_attn_implementation("rolling_xformers")
    use_cuda_graphs(model, compile=True, compile_prefill=True)
    try:
        ours = teacher_forced(model, rolling_cache, chunk, continuation, PROMPTS)
    finally:
        release_cuda_graphs(model)
    width = max(PROMPTS)
    assert len(calls) == model.config.num_hidden_layers * -(-width // (chunk or width))
    assert not switch.refused
    sdpa, truth = references(model, chunk, continuation, PROMPTS)
    scale = truth.abs().max().item()
    error, sdpa_error = (ours - truth).abs().max().item(), (sdpa - truth).abs().max().item()
    print(f"scale={scale:.3f} ours={error:.4f} sdpa={sdpa_error:.4f}")
    assert error <= 2 * sdpa_error + 2e-3 * scale


@torch.no_grad()
def test_after_a_warm_up_prompts_of_other_lengths_compile_nothing_and_give_transformers_tokens(
        compiled_prefill_on_cpu, fresh_dynamo):
    """``use_cuda_graphs(compile=True, compile_prefill=True)`` through generate's chunked prefill (made to run on
    CPU tensors here): once a prompt of one tile of 128 tokens and one in chunks (first, later and last chunks of
    several tiles) have run, prompts of other lengths run without compiling anything (generate hands each chunk a
    slice of the prompt's position_ids, strided by the prompt's length), and give Transformers' tokens."""
    from hf_rolling_cache import RollingSlidingWindowCache, release_cuda_graphs, use_cuda_graphs

    reference, rolling = model_pair(tiny_config(40, layers=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no CUDA here: decode steps eager)
        use_cuda_graphs(rolling, compile=True, compile_prefill=True)

    def generate(model, length, **options):
        ids = torch.randint(1, 97, (1, length), generator=torch.Generator().manual_seed(length))
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                              pad_token_id=0, **options)

    try:
        for length in (20, 320):  # one chunk; chunks of 150, 150 and 20
            generate(rolling, length, past_key_values=RollingSlidingWindowCache(config=rolling.config),
                     prefill_chunk_size=150)
        calls = len(compiled_prefill_on_cpu)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for length in (200, 77, 451):
                ours = generate(rolling, length, past_key_values=RollingSlidingWindowCache(config=rolling.config),
                                prefill_chunk_size=150)
                assert torch.equal(ours, generate(reference, length))
    finally:
        release_cuda_graphs(rolling)
    # every prefill chunk of more than one token, every layer it runs (an early chunk of a long prompt stops under
    # the layers nobody reads: `_reach`)
    from hf_rolling_cache._reach import layers_to_run

    def runs(length: int) -> int:
        starts = range(0, length, 150)
        ends = [min(start + 150, length) for start in starts]
        return sum(2 if end == length else layers_to_run([40, 40], [40, 40], end, length)
                   for start, end in zip(starts, ends) if end - start > 1)

    assert len(compiled_prefill_on_cpu) - calls == runs(200) + runs(77) + runs(451)


def test_the_compiled_prefill_hands_its_layers_tensors_in_standard_strides():
    """A ``[1, chunk]`` slice of a longer row (what generate passes as a chunk's position_ids) counts as contiguous,
    yet its row stride is the row's length: the layers get a copy in standard strides, other tensors as they are."""
    from hf_rolling_cache._compiled import _with_contiguous_inputs

    seen = {}

    def layer(hidden, position_embeddings=None, position_ids=None, flag=True):
        seen.update(hidden=hidden, embeddings=position_embeddings, position_ids=position_ids, flag=flag)

    row = torch.arange(500)[None]
    hidden, cos, sin = torch.zeros(1, 7, 4), torch.zeros(1, 7, 2), torch.zeros(1, 7, 2)
    _with_contiguous_inputs(layer)(hidden, position_embeddings=(cos, sin), position_ids=row[:, 100:107], flag=False)
    assert seen["position_ids"].stride() == (7, 1) and torch.equal(seen["position_ids"], row[:, 100:107])
    assert seen["hidden"] is hidden and all(a is b for a, b in zip(seen["embeddings"], (cos, sin)))
    assert seen["flag"] is False
