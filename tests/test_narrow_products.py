"""Our decode-step product kernel (`_narrow_products`): against ``F.linear`` through Triton's interpreter on CPU (every
launch kind, strided and 3-D inputs, biases, float32 and float16), which weights it takes, and the compiled decode
step that calls it (inductor keeps one product per fused group, the logits stay eager's and Transformers'). The GPU
test runs it in bfloat16 and float32 inside captured steps."""

import os

import pytest
import torch
import torch.nn.functional as F

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache, _kernels
from hf_rolling_cache._compiled import CompiledLayers
from tests.conftest import model_pair, ragged_batch, tiny_config
from tests.test_graphs import decode_logits

_narrow_products = pytest.importorskip("hf_rolling_cache._narrow_products")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# CPU models whose compiled step calls the kernel on CPU tensors: Triton's interpreter only (a GPU machine runs the
# same step captured on CUDA, below)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


@pytest.fixture
def on_every_device(monkeypatch):
    """The kernel on CPU too (Triton's interpreter), as on CUDA."""
    monkeypatch.setattr(_kernels._narrow_products, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", False)


@pytest.fixture
def product_calls(monkeypatch, on_every_device) -> list[tuple]:
    """Every call of the kernel: (rows, weight shape), the shape followed by "gated" for `gated_product`'s and by
    "added" for a product with a residual."""
    calls = []
    run = _narrow_products.narrow_linear

    def counted(input, weight, *args, gated=False, residual=None, **kwargs):
        kind = ("gated",) if gated else ("added",) if residual is not None else ()
        calls.append((input.numel() // input.shape[-1], tuple(weight.shape) + kind))
        return run(input, weight, *args, gated=gated, residual=residual, **kwargs)

    monkeypatch.setattr(_narrow_products, "narrow_linear", counted)
    return calls


@pytest.mark.parametrize("out_features,kind,block_n", [
    (64, "_ONE_WAVE", 32), (48, "_ONE_WAVE", 16), (768, "_ONE_WAVE_WIDE", 64), (2048, "_MANY_WAVES", 32)
], ids=["one-wave", "one-wave-of-16-rows", "one-wide-wave", "many-waves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_launch_kind_multiplies_as_f_linear(on_every_device, monkeypatch, out_features, kind, block_n, dtype):
    """With 16 multiprocessors (what the CPU pretends to have), 64 rows are one wave of 32-row programs (48: of
    16-row ones, the largest that divides), 768 one wave of 64-row programs, 2048 many waves. 1024 columns: every
    program carries its sums over 4 to 16 steps. Rows from 1 to 16, with and without a bias."""
    monkeypatch.setattr(_narrow_products, "_multiprocessors", lambda device: 16)
    generator = torch.Generator().manual_seed(out_features)
    weight = (torch.randn(out_features, 1024, generator=generator) / 1024**0.5).to(DEVICE, dtype)
    bias = torch.randn(out_features, generator=generator).to(DEVICE, dtype)
    launch = _narrow_products.launch_for(weight, bias)
    rows_per_program, row_bytes, warps, stages = getattr(_narrow_products, kind)
    assert launch == [block_n, row_bytes // dtype.itemsize, warps, stages]
    for rows in (1, 5, 16):
        x = torch.randn(rows, 1024, generator=generator).to(DEVICE, dtype)
        for b in (None, bias):
            got = _narrow_products.narrow_linear(x, weight, b, launch)
            expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
            tolerance = 2e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance)
            assert got.dtype == dtype and got.shape == (rows, out_features)


@pytest.mark.parametrize("out_features", [64, 768, 2048], ids=["one-wave", "one-wide-wave", "many-waves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_products_give_the_mlps_activation(on_every_device, monkeypatch, out_features, dtype):
    """``silu(gate) * up`` of a gate/up weight (gate's rows first), every launch kind: as the MLP computes it from
    the products, rounded where it rounds (to the dtype after each product and after the activation), with and
    without a bias, rows 1 to 16. float16 bit for bit but for a rare last-place step (another exp, another order
    of sums)."""
    monkeypatch.setattr(_narrow_products, "_multiprocessors", lambda device: 16)
    generator = torch.Generator().manual_seed(out_features + 1)
    weight = (torch.randn(out_features, 1024, generator=generator) / 1024**0.5).to(DEVICE, dtype)
    bias = torch.randn(out_features, generator=generator).to(DEVICE, dtype)
    launch = _narrow_products.launch_for(weight, bias)
    for rows in (1, 5, 16):
        x = torch.randn(rows, 1, 1024, generator=generator).to(DEVICE, dtype)
        for b in (None, bias):
            got = _narrow_products.gated_product(x, weight, b, launch)
            products = F.linear(x.float(), weight.float(), None if b is None else b.float()).to(dtype)
            gate, up = products.chunk(2, dim=-1)
            expected = (F.silu(gate.float()).to(dtype).float() * up.float()).to(dtype)
            assert got.dtype == dtype and got.shape == (rows, 1, out_features // 2)
            if dtype == torch.float32:
                torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
            else:
                assert_rounded_as(got, expected)
    # more rows than the kernel takes: F.linear, then the activation, and no kernel
    monkeypatch.setattr(_narrow_products, "narrow_linear", None)
    x = torch.randn(17, 1024, generator=generator).to(DEVICE, dtype)
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    torch.testing.assert_close(_narrow_products.gated_product(x, weight, bias, launch), F.silu(gate) * up)


def assert_rounded_as(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float16 results rounded where ``expected`` was: at least 95% of them the same bits (98.7-100% here), the
    others a few steps in the last place away (another order of sums, or another exp, may put an intermediate value
    on the other side of a rounding, and the steps after carry it). Skipping a rounding on the way leaves 53-61% of
    them equal."""
    same = (got == expected).float().mean().item()
    step = 2.0 ** (torch.floor(torch.log2(expected.float().abs().clamp_min(2**-14))) - 10)
    assert same >= 0.95, f"only {same:.1%} bit-equal"
    assert ((got.float() - expected.float()).abs() <= 4 * step).all()


def test_a_residual_is_added_as_pytorch_adds_it(on_every_device):
    """``residual + product`` in the kernel: the product rounded to float16, then the float32 sum rounded, as
    PyTorch's linear and add do; with a bias, a residual of strided rows (a slice of wider ones), and 3-D input."""
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(64, 1024, generator=generator) / 32).to(DEVICE, torch.float16)
    bias = torch.randn(64, generator=generator).to(DEVICE, torch.float16)
    launch = _narrow_products.launch_for(weight, bias)
    x = torch.randn(5, 1, 1024, generator=generator).to(DEVICE, torch.float16)
    wide = (torch.randn(5, 1, 96, generator=generator) * 4).to(DEVICE, torch.float16)
    for b in (None, bias):
        for residual in (wide[..., :64].contiguous(), wide[..., 16:80]):
            got = torch.ops.hf_rolling_cache.narrow_linear_add(x, weight, b, launch, residual)
            product = F.linear(x.float(), weight.float(), None if b is None else b.float()).to(torch.float16)
            expected = (residual.float() + product.float()).to(torch.float16)
            assert got.shape == expected.shape and got.is_contiguous()
            assert_rounded_as(got, expected)


def test_strided_and_batched_inputs(on_every_device):
    """A slice of wider rows (o_proj reading the q columns of a fused q/k/v product) and ``[B, 1, K]`` inputs."""
    generator = torch.Generator().manual_seed(2)
    weight = (torch.randn(96, 64, generator=generator) / 8).to(DEVICE)
    launch = _narrow_products.launch_for(weight)
    wide = torch.randn(3, 200, generator=generator).to(DEVICE)
    x = wide[:, 16:80]
    assert x.stride() == (200, 1)
    torch.testing.assert_close(_narrow_products.narrow_linear(x, weight, None, launch), F.linear(x, weight),
                               rtol=0, atol=1e-5)
    batched = torch.randn(4, 7, 64, generator=generator).to(DEVICE)[:, -1:]  # the head reads each row's last position
    got = _narrow_products.narrow_linear(batched, weight, None, launch)
    assert got.shape == (4, 1, 96)
    torch.testing.assert_close(got, F.linear(batched, weight), rtol=0, atol=1e-5)


def test_which_weights_it_takes(on_every_device, monkeypatch):
    launch_for = _narrow_products.launch_for
    weight = torch.randn(64, 128)
    assert launch_for(weight) is not None
    assert launch_for(torch.randn(97, 128)) is None  # rows no tile divides
    assert launch_for(torch.randn(64, 24)) is None  # columns no tile of at least 16 divides
    assert launch_for(torch.randn(128, 64).t()) is None  # a transposed view: rows not contiguous
    assert launch_for(weight.to(torch.int8)) is None
    assert launch_for(weight, torch.randn(64, dtype=torch.float16)) is None  # a bias of another dtype
    assert launch_for(weight, torch.randn(1)) is None  # one bias for every row: F.linear broadcasts it, not the kernel
    assert launch_for(weight.to("meta")) is None  # not on a device it runs on
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", True)
    assert launch_for(weight) is None
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", False)
    with _kernels.exact_kernels():
        assert launch_for(weight) is None
    with _kernels.narrow_product_kernel(False):
        assert launch_for(weight) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts F.linear's inputs; the kernel would not
        assert launch_for(weight) is None
    assert launch_for(weight) is not None


@pytest.mark.parametrize("out_features", [16, 48, 80, 512, 1000, 4096, 6144, 32000])
@pytest.mark.parametrize("in_features", [16, 48, 640, 2048, 4096, 14336])
def test_tiles_divide_every_weight_they_are_given_for(monkeypatch, out_features, in_features):
    monkeypatch.setattr(_kernels._narrow_products, "devices", ("meta",))  # shapes only: no memory for the weights
    launch = _narrow_products.launch_for(torch.empty(out_features, in_features, dtype=torch.bfloat16, device="meta"))
    if launch is None:
        assert out_features % 16 or in_features % 16
    else:
        block_n, block_k, _, _ = launch
        assert out_features % block_n == 0 and in_features % block_k == 0 and block_n >= 16 and block_k >= 16


def test_product_takes_at_most_sixteen_rows(product_calls):
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(64, 128, generator=generator) / 128**0.5).to(DEVICE)
    launch = _narrow_products.launch_for(weight)
    for rows in (1, 16, 17):
        x = torch.randn(rows, 128, generator=generator).to(DEVICE)
        torch.testing.assert_close(_narrow_products.product(x, weight, None, launch), F.linear(x, weight),
                                   rtol=0, atol=1e-5)
    assert product_calls == [(1, (64, 128)), (16, (64, 128))]


def test_a_kernel_triton_cannot_build_falls_back_to_f_linear_and_says_so(on_every_device, monkeypatch):
    from triton.runtime.errors import OutOfResources

    def refused(*args, **kwargs):
        raise OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(_narrow_products, "narrow_linear", refused)
    warnings = []
    monkeypatch.setattr(_kernels.logger, "warning", lambda message, *args: warnings.append(message % args))
    generator = torch.Generator().manual_seed(4)
    weight, x = torch.randn(64, 128, generator=generator) / 128**0.5, torch.randn(2, 128, generator=generator)
    launch = _narrow_products.launch_for(weight)
    torch.testing.assert_close(torch.ops.hf_rolling_cache.narrow_linear(x, weight, None, launch),
                               F.linear(x, weight), rtol=0, atol=1e-5)
    assert _kernels._narrow_products.unbuildable and len(warnings) == 1 and "cuBLAS" in warnings[0]
    assert _narrow_products.launch_for(weight) is None  # and nothing asks for the kernel again
    # the gated and residual operators (already compiled code may still call them): the same products, by F.linear
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    torch.testing.assert_close(torch.ops.hf_rolling_cache.gated_narrow_linear(x, weight, None, launch),
                               F.silu(gate) * up, rtol=0, atol=1e-5)
    residual = torch.randn(2, 64, generator=generator)
    torch.testing.assert_close(torch.ops.hf_rolling_cache.narrow_linear_add(x, weight, None, launch, residual),
                               residual + F.linear(x, weight), rtol=0, atol=1e-5)
    assert len(warnings) == 1


@interpreted
@pytest.mark.usefixtures("fresh_dynamo")
def test_the_compiled_step_multiplies_with_the_kernel(product_calls):
    """Inductor keeps the operators whole and one product per fused group (four a layer, no cuBLAS call left), the
    MLP's activation computed in its gate/up product (no kernel of inductor's computes it) and the residual add in
    the down product; the head (vocabulary 160: tiles divide it) multiplies eagerly with the kernel too. Logits: eager's, and
    Transformers' to 1e-4."""
    from torch._inductor.utils import run_and_get_code

    reference, model = model_pair(tiny_config(4, layers=2, vocab=160))
    input_ids, attention_mask = ragged_batch([7, 2, 5], vocab=160)
    eager, sequences, full_mask = decode_logits(model, input_ids, attention_mask, 3)
    assert product_calls == []  # nothing outside the compiled step
    compiled = CompiledLayers(model)
    (got, _, _), codes = run_and_get_code(decode_logits, model, input_ids, attention_mask, 3, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    expected = reference(input_ids=sequences, attention_mask=full_mask).logits[:, -3:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    code = "\n".join(codes)
    products = code.count("torch.ops.hf_rolling_cache.narrow_linear.default(")
    gated = code.count("torch.ops.hf_rolling_cache.gated_narrow_linear.default(")
    added = code.count("torch.ops.hf_rolling_cache.narrow_linear_add.default(")  # the down product and its add
    assert (products, gated, added) == (2, 1, 1)
    assert "extern_kernels.mm(" not in code and "extern_kernels.addmm(" not in code
    assert "silu" not in code and "exp(" not in code
    heads = [call for call in product_calls if call[1] == (160, 64)]
    assert len(heads) == 3 and all(rows == 3 for rows, _ in heads)  # the head, once a step
    for linear in compiled._linears:  # nothing of ours left on the modules
        assert "forward" not in vars(linear) and "narrow_launch" not in vars(linear)


@interpreted
@pytest.mark.usefixtures("fresh_dynamo")
def test_a_product_someone_else_wraps_keeps_its_forward(product_calls):
    _, model = model_pair(tiny_config(4, layers=1, vocab=128))
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    compiled = CompiledLayers(model, backend="aot_eager")
    input_ids, attention_mask = ragged_batch([7, 2, 5], vocab=128)
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2)
    got, _, _ = decode_logits(model, input_ids, attention_mask, 2, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    down = tuple(model.model.layers[0].mlp.down_proj.weight.shape)
    assert seen and product_calls and all(weight != down for _, weight in product_calls)


@interpreted
@pytest.mark.usefixtures("fresh_dynamo")
def test_a_product_shared_by_two_layers_is_swapped_once_and_put_back(product_calls):
    """One ``nn.Linear`` in two layers: swapped in (and put back) once, the logits eager's, and nothing of ours left
    on any module, also after a step that raises."""
    _, model = model_pair(tiny_config(4, layers=2, vocab=160))
    layers = model.model.layers
    layers[1].mlp.down_proj = layers[0].mlp.down_proj
    input_ids, attention_mask = ragged_batch([7, 2, 5], vocab=160)
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2)
    compiled = CompiledLayers(model, backend="aot_eager")
    got, _, _ = decode_logits(model, input_ids, attention_mask, 2, compiled)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    assert product_calls
    with pytest.raises(RuntimeError, match="a failing step"), compiled.swapped_in():
        assert "forward" in vars(model.lm_head)
        raise RuntimeError("a failing step")
    for module in model.modules():
        assert not {"forward", "narrow_launch", "fused_rows", "fused_launch"} & set(vars(module)), module


@pytest.mark.gpu
def test_bfloat16_launches_on_the_gpu_eager_and_captured():
    """Each launch kind on an H100's shapes (o, q/k/v, a many-wave weight) in bfloat16 against float32 products of
    the same values (and their gated activation), rows 1 to 16 of strided 3-D inputs, with a bias; then captured in a CUDA graph right after the
    kernel that writes its input (a dependent launch must wait for that one)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the kernel serves Hopper and later")
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).to(torch.bfloat16)

    for out_features, in_features in ((4096, 4096), (6144, 4096), (16384, 1024)):
        weight, bias = randn(out_features, in_features) / in_features**0.5, randn(out_features)
        launch = _narrow_products.launch_for(weight, bias)
        assert launch is not None
        for rows in (1, 5, 16):
            x = randn(rows, 1, in_features + 64)[..., 32:32 + in_features]
            got = _narrow_products.narrow_linear(x, weight, bias, launch)
            expected = F.linear(x.float(), weight.float(), bias.float())
            torch.testing.assert_close(got.float(), expected, rtol=0, atol=8e-3 * expected.abs().max().item())
            gate, up = F.linear(x.float(), weight.float(), bias.float()).chunk(2, dim=-1)
            expected = F.silu(gate) * up
            got = _narrow_products.gated_product(x, weight, bias, launch)
            torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())

    weight = randn(4096, 4096) / 64
    launch = _narrow_products.launch_for(weight)
    source, x = randn(8, 4096), torch.empty(8, 4096, device="cuda", dtype=torch.bfloat16)
    _narrow_products.narrow_linear(x, weight, None, launch)  # built before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(source * 2)
        out = _narrow_products.narrow_linear(x, weight, None, launch)
    for _ in range(3):
        source.copy_(randn(8, 4096))
        graph.replay()
        expected = F.linear((source * 2).float(), weight.float())
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=8e-3 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_compiled_steps_multiply_with_the_kernel_on_the_gpu(product_calls, dtype):
    """Compiled graphs with the kernel: fp32 tokens and logits as the eager rolling path's, bf16 logits as those of
    the same captured step multiplied by cuBLAS (near, not equal: another summation order)."""
    from tests.test_gpu import LENGTHS, WINDOW, gpu_model

    model = gpu_model(dtype)
    model.set_attn_implementation("rolling_xformers")
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, vocab=1000, seed=3))
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2 * WINDOW, do_sample=False,
                   output_scores=True, return_dict_in_generate=True, pad_token_id=0)

    def graphed(kernel: bool):
        with _kernels.narrow_product_kernel(kernel):
            hf_rolling_cache.use_cuda_graphs(model, compile=True)
            try:
                return model.generate(**options, past_key_values=RollingSlidingWindowCache(config=model.config))
            finally:
                hf_rolling_cache.release_cuda_graphs(model)

    ours = graphed(True)
    assert product_calls, "the captured step did not call the kernel"
    theirs = graphed(False) if dtype == torch.bfloat16 else model.generate(
        **options, past_key_values=RollingSlidingWindowCache(config=model.config))
    if dtype == torch.float32:
        assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores):
        tolerance = 1e-4 if dtype == torch.float32 else 0.05 * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance)
        if dtype == torch.bfloat16:
            break  # greedy near-ties may part the two bf16 runs after the first token


@interpreted
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["qwen2", "gemma3", "starcoder2"])
def test_other_families_compiled_with_the_kernel_give_eager_logits(product_calls, name):
    """Biased products (Qwen2's q/k/v, Starcoder2's every product) and global layers (Gemma 3): the compiled step
    with the kernel gives the eager step's logits."""
    from tests.families import build

    model = build(name, 4, seed=1)
    hf_rolling_cache.enable(model)
    input_ids, attention_mask = ragged_batch([9, 2, 6], seed=3)
    eager, _, _ = decode_logits(model, input_ids, attention_mask, 2)
    assert product_calls == []
    got, _, _ = decode_logits(model, input_ids, attention_mask, 2, CompiledLayers(model))
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    assert product_calls, "the compiled step did not call the kernel"
