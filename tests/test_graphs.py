"""CUDA graph decoding's compile option, on CPU: the compiled decoder layers (the "aot_eager" backend, which
traces and partitions like inductor without generating kernels) give the eager path's logits, break the graph
at the cache and the attention, and are installed only inside `swapped_in`. The captured graphs themselves run
in tests/test_gpu.py."""

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache, release_cuda_graphs, use_cuda_graphs
from hf_rolling_cache._compiled import CompiledLayers
from tests.conftest import model_pair, ragged_batch, tiny_config
from tests.families import FAMILIES, build

WINDOW = 4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@torch.no_grad()
def decode_logits(model, input_ids, attention_mask, steps, compiled=None):
    """Prefill eagerly, then ``steps`` greedy decode steps planned on the device, through ``compiled`` if given."""
    cache = RollingSlidingWindowCache(config=model.config)
    cache.decode_on_device = True
    out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    logits = []
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        input_ids = torch.cat([input_ids, token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        if compiled is None:
            out = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache)
        else:
            with compiled.swapped_in(cache):
                out = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1), input_ids, attention_mask


def test_compiled_layers_match_eager_and_break_at_the_cache_and_attention():
    reference, model = model_pair(tiny_config(WINDOW, layers=3))
    input_ids, attention_mask = ragged_batch([7, 2, 5])
    steps = 2 * WINDOW + 1
    eager, sequences, full_mask = decode_logits(model, input_ids, attention_mask, steps)

    torch._dynamo.utils.counters.clear()
    compiled = CompiledLayers(model, backend="aot_eager")
    got, _, _ = decode_logits(model, input_ids, attention_mask, steps, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    expected = reference(input_ids=sequences, attention_mask=full_mask).logits[:, -steps:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)

    breaks = " ".join(torch._dynamo.utils.counters["graph_break"])
    assert "RollingSlidingWindowCache.update" in breaks and "rolling_attention_forward" in breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"

    # A second cache (a new generate call) reuses the compiled code: no new graphs.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again, _, _ = decode_logits(model, input_ids, attention_mask, 2, compiled)
    torch.testing.assert_close(again, eager[:, :2], rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_one_compiled_code_serves_every_layer():
    """``layer_idx`` is a tensor while the compiled layers are swapped in, so dynamo does not specialize on it: a
    deeper model compiles no more graphs (before, one recompile per layer made most of a 7B model's warm-up)."""
    graphs = {}
    for layers in (2, 6):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        _, model = model_pair(tiny_config(WINDOW, layers=layers))
        input_ids, attention_mask = ragged_batch([7, 2, 5])
        eager, _, _ = decode_logits(model, input_ids, attention_mask, 3)
        got, _, _ = decode_logits(model, input_ids, attention_mask, 3, CompiledLayers(model, backend="aot_eager"))
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
        graphs[layers] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert not torch._dynamo.utils.counters["recompiles"], dict(torch._dynamo.utils.counters["recompiles"])
    assert graphs[6] == graphs[2], graphs


def assert_compiled_matches_eager(model, compiled, input_ids, attention_mask) -> torch.Tensor:
    """Two decode steps through ``compiled`` and a prefill through its compiled prefill give the eager path's logits
    (and Transformers' own, for the prefill); returns the eager decode logits."""
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2)
    got, _, _ = decode_logits(model, input_ids, attention_mask, 2, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    with torch.no_grad(), compiled.prefill_swapped_in():
        cache = RollingSlidingWindowCache(config=model.config)
        prefilled = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache).logits
    torch.testing.assert_close(prefilled, model(input_ids=input_ids, attention_mask=attention_mask).logits,
                               rtol=0, atol=1e-5)
    return eager


def test_layers_compiled_with_our_inductor_options_share_one_code(monkeypatch):
    """The default backend, inductor with our options (a post-grad pass object): torch.compile reuses one module's
    code for another only if their backends compare equal. Every layer shares the first one's code (before: each
    compiled again, BACKEND_MATCH, 32 compilations of a 7B model's decode step and prefill), and so does a second
    `CompiledLayers` (its pass a copy, equal). Inductor's code generation is stubbed out (the graphs run as traced);
    its backend objects and their matching are real."""
    import torch._inductor.compile_fx as compile_fx

    monkeypatch.setattr(compile_fx, "compile_fx", lambda graph, inputs, **options: graph.forward)
    graphs = {}
    for layers in (2, 5):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        _, model = model_pair(tiny_config(WINDOW, layers=layers))
        compiled = CompiledLayers(model, prefill=True)
        input_ids, attention_mask = ragged_batch([7, 2, 5])
        eager = assert_compiled_matches_eager(model, compiled, input_ids, attention_mask)
        graphs[layers] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs[5] == graphs[2] > 0, graphs  # (before: 43 graphs against 19)
    # A second CompiledLayers (release_cuda_graphs, then use_cuda_graphs again) builds its own options, with a pass
    # of its own: equal, so the code compiled for the first serves it.
    compiled.release()
    again, _, _ = decode_logits(model, input_ids, attention_mask, 2, CompiledLayers(model, prefill=True))
    torch.testing.assert_close(again, eager, rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs[5]


def test_a_compilation_that_fails_runs_its_layers_eagerly(monkeypatch):
    """A backend that fails (as inductor may on some model): the decode step and the prefill still give the eager
    path's logits, the failing code run eagerly (with PyTorch's warning), not an exception in the user's generate."""
    monkeypatch.setattr("hf_rolling_cache._compiled.EAGER_ON_COMPILE_ERROR", True)  # (as users run; tests raise)
    failures = []

    def failing(graph, inputs):
        failures.append(graph)
        raise RuntimeError("a compiler bug")

    _, model = model_pair(tiny_config(WINDOW, layers=2))
    input_ids, attention_mask = ragged_batch([7, 2, 5])
    assert_compiled_matches_eager(model, CompiledLayers(model, backend=failing, prefill=True), input_ids,
                                  attention_mask)
    assert failures, "the backend was never asked to compile"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_compiled_layers_of_every_family_match_eager(name):
    """Each family's decoder layers compiled (sliding and global kinds, softcaps, sinks, per-layer extras) with
    the tensor ``layer_idx``: the eager rolling path's logits."""
    model = build(name, WINDOW, seed=1)
    hf_rolling_cache.enable(model)
    try:
        compiled = CompiledLayers(model, backend="aot_eager")
    except ValueError:
        pytest.skip("no model.get_decoder().layers: compile=True refuses it")
    input_ids, attention_mask = ragged_batch([9, 2, 6], seed=3)
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2 * WINDOW)
    got, _, _ = decode_logits(model, input_ids, attention_mask, 2 * WINDOW, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_compiled_layers_are_installed_only_while_swapped_in():
    _, model = model_pair(tiny_config(WINDOW, layers=2))
    cache = RollingSlidingWindowCache(config=model.config)
    compiled = CompiledLayers(model, backend="aot_eager")
    assert compiled.modules == [*model.model.layers, model.model.norm]
    with compiled.swapped_in(cache):
        assert all("forward" in vars(module) for module in compiled.modules)
        assert all("decode_writer" in vars(layer) for layer in cache.layers)
        assert [layer.self_attn.layer_idx.item() for layer in model.model.layers] == [0, 1]  # tensors meanwhile
    assert not any("forward" in vars(module) for module in compiled.modules)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert all(type(layer.self_attn.layer_idx) is int for layer in model.model.layers)
    assert not any("decode_writer" in vars(layer) for layer in cache.layers)
    with pytest.raises(RuntimeError, match="boom"), compiled.swapped_in(cache):
        raise RuntimeError("boom")
    assert not any("forward" in vars(module) for module in compiled.modules)
    assert not any("decode_writer" in vars(layer) for layer in cache.layers)

    # A forward the instance already had (as an Accelerate hook sets) is put back, not deleted.
    def hooked_forward(*args, **kwargs):
        return type(model.model.norm).forward(model.model.norm, *args, **kwargs)

    model.model.norm.forward = hooked_forward
    with compiled.swapped_in(cache):
        assert model.model.norm.forward is not hooked_forward
    assert model.model.norm.forward is hooked_forward


def test_compiled_ring_write_keeps_padded_rows():
    """The compiled decode write: real rows land in their slots, a padded row's slot keeps its old value."""
    torch.manual_seed(0)
    batch, window, heads, head_dim = 3, WINDOW, 2, 8
    rings = [torch.randn(batch * window, heads, head_dim) for _ in range(2)]
    new = [torch.randn(batch, heads, head_dim) for _ in range(2)]
    slots = torch.tensor([1, window + 3, 2 * window])
    keep = torch.tensor([True, False, True]).view(-1, 1, 1)
    expected = [ring.clone() for ring in rings]
    for ring, tokens in zip(expected, new):
        ring[slots[keep.view(-1)]] = tokens[keep.view(-1)]
    compiled = CompiledLayers(model_pair(tiny_config(WINDOW, layers=1))[1], backend="aot_eager")
    ring_layer = RollingSlidingWindowCache(window=WINDOW, num_layers=1).layers[0]
    compiled._compiled_writer(ring_layer)(*rings, *new, slots, keep)
    for got, want in zip(rings, expected):
        assert torch.equal(got, want)


def test_use_cuda_graphs_switches_compile_on_and_releases():
    _, model = model_pair(tiny_config(WINDOW, layers=2))
    class_forward = type(model).forward
    use_cuda_graphs(model)
    assert model._hf_rolling_cache_compiled_layers is None
    use_cuda_graphs(model, compile=True)  # switches
    compiled = model._hf_rolling_cache_compiled_layers
    assert isinstance(compiled, CompiledLayers)
    use_cuda_graphs(model, compile=True)  # already so: kept
    assert model._hf_rolling_cache_compiled_layers is compiled
    use_cuda_graphs(model)  # and back
    assert model._hf_rolling_cache_compiled_layers is None
    caches = [RollingSlidingWindowCache(config=model.config) for _ in range(2)]
    input_ids, attention_mask = ragged_batch([5, 2])
    with torch.no_grad():
        for cache in caches:
            model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
            cache.decode_graph = object()  # stands in for a captured graph (no CUDA here)
    release_cuda_graphs(model)
    assert model.forward.__func__ is class_forward
    assert not hasattr(model, "_hf_rolling_cache_compiled_layers")
    assert all(cache.decode_graph is None for cache in caches)  # their graphs freed with the release


def test_compile_refuses_a_model_without_decoder_layers():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="compile=False"):
        use_cuda_graphs(model, compile=True)
    assert not hasattr(model, "_hf_rolling_cache_eager_forward")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without CUDA")
def test_use_cuda_graphs_without_cuda_warns_once():
    from hf_rolling_cache import graphs, release_cuda_graphs, use_cuda_graphs

    graphs._warn_no_cuda.cache_clear()
    _, model = model_pair(tiny_config(4))
    with pytest.warns(UserWarning, match="CUDA is not available"):
        use_cuda_graphs(model)
    release_cuda_graphs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        use_cuda_graphs(model)  # once per process
    release_cuda_graphs(model)


def test_inductor_launches_its_kernels_plainly_unless_asked(monkeypatch):
    """Inductor's kernels of the compiled step are plain launches (set explicitly, whatever the environment says),
    and dependent launches only where asked and where ours are."""
    from hf_rolling_cache import _compiled, _ring_decode

    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        pytest.skip("this PyTorch's inductor has no programmatic dependent launch")
    monkeypatch.setattr(torch._inductor.config.triton, "enable_pdl", True)  # as TORCHINDUCTOR_ENABLE_PDL=1 would
    assert _compiled._inductor_options()["triton.enable_pdl"] is False
    monkeypatch.setattr(_compiled, "INDUCTOR_DEPENDENT_LAUNCH", True)
    assert _compiled._inductor_options()["triton.enable_pdl"] is True
    monkeypatch.setitem(_ring_decode._CONFIG, "dependent_launch", False)
    assert _compiled._inductor_options()["triton.enable_pdl"] is False
