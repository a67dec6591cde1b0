"""The fused q/k/v and gate/up products of the compiled decode step (`_fused`), on CPU: the parameters become views of
one buffer per group with nothing else changed, the compiled step computes each group's product once (inductor) and
gives the eager logits, a group whose weight was replaced since runs unfused, and release gives each parameter its
own storage back. The captured graphs run in tests/test_gpu.py."""

import warnings

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache._compiled import CompiledLayers
from hf_rolling_cache._fused import FusedGroup, fuse_groups
from tests.conftest import model_pair, ragged_batch, tiny_config
from tests.families import build
from tests.test_graphs import decode_logits

WINDOW = 4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_groups_become_views_of_one_buffer_and_eager_logits_stay_the_same():
    _, model = model_pair(tiny_config(WINDOW, layers=2))
    input_ids, attention_mask = ragged_batch([7, 2, 5])
    before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = dict(model.named_parameters())

    groups = fuse_groups(model, list(model.model.layers))
    assert [[type(p).__name__ for p in g.parts] for g in groups] == [["Linear"] * 3, ["Linear"] * 2] * 2
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert len({storage(attention.q_proj.weight), storage(attention.k_proj.weight),
                    storage(attention.v_proj.weight)}) == 1
        assert storage(mlp.gate_proj.weight) == storage(mlp.up_proj.weight) != storage(mlp.down_proj.weight)
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, before)

    for group in groups:
        group.separate()
    assert len({storage(p) for p in model.parameters()}) == len(list(model.parameters()))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_biases_are_fused_with_their_weights():
    model = build("qwen2", WINDOW, seed=1)  # q/k/v with biases
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None
    bias = attention.k_proj.bias.clone()
    group = next(g for g in fuse_groups(model, list(model.model.layers)) if attention.q_proj in g.parts)
    assert group.bias is not None and storage(attention.k_proj.bias) == storage(group.bias)
    assert torch.equal(attention.k_proj.bias, bias)


def test_what_is_not_plain_stays_unfused():
    _, model = model_pair(tiny_config(WINDOW, layers=3))
    first, second, third = model.model.layers
    first.self_attn.k_proj.register_forward_hook(lambda *args: None)  # someone's hook runs around it
    second.mlp.up_proj.weight = second.mlp.gate_proj.weight  # tied to its sibling
    third.self_attn.v_proj.weight.data = torch.zeros(64 * 64)[: 32 * 64].view(32, 64)  # part of a larger buffer
    groups = fuse_groups(model, list(model.model.layers))
    fused = [tuple(g.parts) for g in groups]
    assert fused == [(first.mlp.gate_proj, first.mlp.up_proj),
                     (second.self_attn.q_proj, second.self_attn.k_proj, second.self_attn.v_proj),
                     (third.mlp.gate_proj, third.mlp.up_proj)]


def test_inductor_computes_each_groups_product_once():
    """Each part asks for its group's whole product; the compiled layer keeps one product per group: four a
    layer (q/k/v, o, gate/up, down) instead of seven."""
    from torch._inductor.utils import run_and_get_code

    _, model = model_pair(tiny_config(WINDOW, layers=2))
    input_ids, attention_mask = ragged_batch([7, 2, 5])
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2)
    compiled = CompiledLayers(model)
    (got, _, _), codes = run_and_get_code(decode_logits, model, input_ids, attention_mask, 2, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    products = sum(code.count("extern_kernels.mm(") + code.count("extern_kernels.addmm(") for code in codes)
    assert products == 4, products  # one compiled code serves both layers


def test_a_group_whose_weight_was_replaced_runs_unfused():
    """A weight replaced after fusing, and after a compiled step ran (a new Parameter, as ``model.to`` or
    ``load_state_dict(assign=True)`` make), leaves the group's buffer stale: the compiled step must read the new
    weight, and the stale buffer is dropped."""
    _, model = model_pair(tiny_config(WINDOW, layers=2))
    compiled = CompiledLayers(model, backend="aot_eager")
    input_ids, attention_mask = ragged_batch([7, 2, 5])
    decode_logits(model, input_ids, attention_mask, 2, compiled)  # compiled with every group fused
    k_proj = model.model.layers[1].self_attn.k_proj
    k_proj.weight = torch.nn.Parameter(torch.randn_like(k_proj.weight))
    stale = compiled.groups[2]
    assert [g.intact() for g in compiled.groups] == [True, True, False, True]
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 3)
    got, _, _ = decode_logits(model, input_ids, attention_mask, 3, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    assert stale not in compiled.groups and stale.weight is None
    q_proj = model.model.layers[1].self_attn.q_proj  # separated from the dropped buffer, its own storage again
    assert q_proj.weight.untyped_storage().nbytes() == q_proj.weight.numel() * q_proj.weight.element_size()


def test_a_bias_added_after_fusing_is_not_dropped():
    _, model = model_pair(tiny_config(WINDOW, layers=1))
    compiled = CompiledLayers(model, backend="aot_eager")
    k_proj = model.model.layers[0].self_attn.k_proj
    k_proj.bias = torch.nn.Parameter(torch.randn(k_proj.out_features))
    assert not compiled.groups[0].intact()
    input_ids, attention_mask = ragged_batch([7, 2, 5])
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2)
    got, _, _ = decode_logits(model, input_ids, attention_mask, 2, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_biased_groups_compiled_by_inductor_match_eager():
    """Qwen2's q/k/v carry biases: the fused product is an addmm, kept once by the pass."""
    model = build("qwen2", WINDOW, seed=1)
    hf_rolling_cache.enable(model)
    input_ids, attention_mask = ragged_batch([9, 2, 6], seed=3)
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2)
    got, _, _ = decode_logits(model, input_ids, attention_mask, 2, CompiledLayers(model))
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_a_failed_swap_leaves_no_part_swapped():
    _, model = model_pair(tiny_config(WINDOW, layers=1))
    attention = model.model.layers[0].self_attn
    group = FusedGroup([attention.q_proj, attention.k_proj, attention.v_proj])
    attention.k_proj._hf_rolling_cache_fused_weight = "in the way"  # register_buffer refuses the name
    with pytest.raises(KeyError), group.swapped_in():
        pass
    for part in (attention.q_proj, attention.v_proj):
        assert "forward" not in vars(part) and not part._buffers and not part._non_persistent_buffers_set


def test_a_partly_replaced_group_separates_the_rest():
    _, model = model_pair(tiny_config(WINDOW, layers=1))
    attention = model.model.layers[0].self_attn
    group = FusedGroup([attention.q_proj, attention.k_proj, attention.v_proj])
    new = torch.nn.Parameter(torch.randn_like(attention.q_proj.weight))
    attention.q_proj.weight = new
    group.separate()
    assert attention.q_proj.weight is new
    for part in (attention.k_proj, attention.v_proj):
        assert part.weight.untyped_storage().nbytes() == part.weight.numel() * part.weight.element_size()


def test_parts_compute_their_rows_only_while_swapped_in():
    _, model = model_pair(tiny_config(WINDOW, layers=1))
    compiled = CompiledLayers(model, backend="aot_eager")
    cache = RollingSlidingWindowCache(config=model.config)
    parts = [p for g in compiled.groups for p in g.parts]
    buffers = {name for name, _ in model.named_buffers()}
    with compiled.swapped_in(cache):
        assert all("forward" in vars(part) for part in parts)
        x = torch.randn(3, 64)
        q_proj = model.model.layers[0].self_attn.q_proj
        torch.testing.assert_close(q_proj(x), x @ q_proj.weight.T, rtol=0, atol=1e-6)
    assert not any("forward" in vars(part) for part in parts)
    assert {name for name, _ in model.named_buffers()} == buffers
    assert set(model.state_dict()) == set(model_pair(tiny_config(WINDOW, layers=1))[1].state_dict())


def test_release_gives_each_parameter_its_own_storage(tmp_path):
    """use_cuda_graphs(compile=True) fuses; saving meanwhile writes the same checkpoint; release separates."""
    _, model = model_pair(tiny_config(WINDOW, layers=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: decode steps would run eagerly, but the fusion is done
        hf_rolling_cache.use_cuda_graphs(model, compile=True)
    q_proj, k_proj = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj
    assert storage(q_proj.weight) == storage(k_proj.weight)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())
    hf_rolling_cache.release_cuda_graphs(model)
    assert storage(q_proj.weight) != storage(k_proj.weight)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_group_separated_twice_is_left_alone():
    _, model = model_pair(tiny_config(WINDOW, layers=1))
    group = FusedGroup([model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj])
    group.separate()
    group.separate()
    assert not group.intact()


def test_tensor_parallel_shards_stay_unfused():
    """Under ``tp_plan`` the weights are DTensors (a shard on each process), with no storage of their own to lay
    out: they stay as they are (and counting the model's storages must not touch them)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        _, model = model_pair(tiny_config(WINDOW, layers=1))
        layer = model.model.layers[0]
        for part in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            part.weight = torch.nn.Parameter(distribute_tensor(part.weight.detach(), mesh, [Shard(0)]))
        groups = fuse_groups(model, list(model.model.layers))
        assert [tuple(g.parts) for g in groups] == [(layer.mlp.gate_proj, layer.mlp.up_proj)]
    finally:
        dist.destroy_process_group()


def test_only_the_usual_silu_mlp_computes_its_activation_in_the_product(monkeypatch):
    """`gated_swap` takes a swapped-in gate/up group whose MLP is Llama's ``down(silu(gate(x)) * up(x))`` (here
    Mistral's copy), and leaves alone: a q/k/v group, another activation, an MLP, activation, gate or up module
    someone hooks (or a hook on every module), a SiLU whose forward was replaced, an MLP class with a forward of its
    own, and a group whose product is not our kernel's."""
    pytest.importorskip("hf_rolling_cache._narrow_products")
    from hf_rolling_cache import _kernels
    from hf_rolling_cache._fused import gated_swap

    monkeypatch.setattr(_kernels._narrow_products, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", False)
    _, model = model_pair(tiny_config(WINDOW, layers=1))
    mlp = model.model.layers[0].mlp
    attention_group, mlp_group = fuse_groups(model, list(model.model.layers))

    def swap(group):
        with group.swapped_in():
            return gated_swap(group)

    assert swap(attention_group) is None
    owner, name, forward = swap(mlp_group)
    assert owner is mlp and name == "forward" and forward.__self__ is mlp
    silu = mlp.act_fn
    mlp.act_fn = torch.nn.GELU()
    assert swap(mlp_group) is None
    mlp.act_fn = silu
    handle = silu.register_forward_hook(lambda *args: None)
    assert swap(mlp_group) is None
    handle.remove()
    handle = mlp.register_forward_pre_hook(lambda *args: None)
    assert swap(mlp_group) is None
    handle.remove()
    for part in (mlp.gate_proj, mlp.up_proj):  # the swapped forward does not call the parts: their hooks would not run
        handle = part.register_forward_hook(lambda module, args, out: out * 2)
        assert swap(mlp_group) is None
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    assert swap(mlp_group) is None
    handle.remove()
    monkeypatch.setattr(type(silu), "forward", lambda self, x: torch.tanh(x))  # a SiLU class whose forward is not
    assert swap(mlp_group) is None
    monkeypatch.undo()
    monkeypatch.setattr(_kernels._narrow_products, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", False)

    class Doubled(type(mlp)):
        def forward(self, x):
            return 2 * super().forward(x)

    usual = type(mlp)
    mlp.__class__ = Doubled
    assert swap(mlp_group) is None
    mlp.__class__ = usual
    with _kernels.narrow_product_kernel(False):
        assert swap(mlp_group) is None
    assert swap(mlp_group) is not None


def test_a_residual_add_folds_into_a_lone_product_of_ours_only():
    """`_fold_residual_adds` on a traced graph: ``residual + product`` (either order) becomes one operator with the
    same values; an add with a broadcast, a promotion or an ``alpha``, and a product something else also reads,
    stay as they were."""
    _narrow_products = pytest.importorskip("hf_rolling_cache._narrow_products")
    from torch.fx.experimental.proxy_tensor import make_fx

    from hf_rolling_cache._fused import _fold_residual_adds

    ops = torch.ops.hf_rolling_cache
    launch = [16, 32, 4, 2]

    def step(x, weight, residual, row, wide):
        first = residual + ops.narrow_linear(x, weight, None, launch)  # folds
        second = ops.narrow_linear(first, weight, None, launch) + first  # folds: the other order
        third = ops.narrow_linear(second, weight, None, launch) + row  # a broadcast row: stays
        fourth = torch.add(ops.narrow_linear(third, weight, None, launch), third, alpha=2)  # stays
        fifth = ops.narrow_linear(fourth, weight, None, launch) + wide  # float64: promoted, stays
        shared = ops.narrow_linear(fourth, weight, None, launch)
        return fifth, shared + fourth, shared * 2  # read twice: stays

    generator = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 1, 32, generator=generator), torch.randn(2, 1, 32, generator=generator)
    weight = torch.randn(32, 32, generator=generator) / 8
    row, wide = torch.randn(32, generator=generator), torch.randn(2, 1, 32, generator=generator, dtype=torch.float64)
    inputs = (x, weight, residual, row, wide)
    traced = make_fx(step)(*inputs)
    _fold_residual_adds(traced.graph)
    traced.recompile()
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert targets.count(ops.narrow_linear_add.default) == 2
    assert targets.count(ops.narrow_linear.default) == 4 and targets.count(torch.ops.aten.add.Tensor) == 4
    for got, expected in zip(traced(*inputs), step(*inputs)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
