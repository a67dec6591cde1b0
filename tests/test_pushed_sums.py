"""Pushed sums (`_pushed_sums`): two GPUs' row-parallel products, each pushed into the other's landing buffer by our
product kernel and summed where it lands. Here both "GPUs" are one process on the CPU (Triton's interpreter), each
landing buffer an ordinary tensor (on a GPU machine, both on one GPU, the kernels compiled); tests/test_tensor_parallel.py
runs them across two GPUs inside captured steps."""

import pytest
import torch

from hf_rolling_cache import _kernels

_narrow_products = pytest.importorskip("hf_rolling_cache._narrow_products")
_pushed_sums = pytest.importorskip("hf_rolling_cache._pushed_sums")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def kernel_on_cpu(monkeypatch):
    monkeypatch.setattr(_kernels._narrow_products, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", False)


def landing(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A landing buffer: nothing landed (every element -0.0), as integers of the dtype's width."""
    return torch.full((n,), _pushed_sums.negative_zero(dtype), dtype=_pushed_sums.bits_of(dtype), device=DEVICE)


def push_and_sum(inputs, weights):
    """What two ranks run for one row-parallel sum: each product pushed into the other's landing buffer, then each
    rank's sum of its part and the landed one. Returns (each rank's sum, each rank's landing buffer after)."""
    rows, width = inputs[0].shape[0], weights[0].shape[0]
    dtype = inputs[0].dtype
    landings = [landing(rows * width + 8, dtype) for _ in range(2)]  # (a spare tail: must stay untouched)
    outs = [torch.empty(rows, width, dtype=dtype, device=DEVICE) for _ in range(2)]
    for rank in range(2):
        launch = _narrow_products.launch_for(weights[rank])
        peer = landings[1 - rank][: rows * width].view(rows, width)
        _narrow_products.narrow_linear(inputs[rank], weights[rank], None, launch, out=outs[rank], peer=peer)
    for rank in range(2):
        _pushed_sums.landed_sum(outs[rank], landings[rank][: rows * width].view(rows, width))
    return outs, landings


@pytest.mark.parametrize("dtype", [
    torch.float32, torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="on a GPU only")),
])
def test_both_ranks_get_the_sum_of_the_rounded_parts_and_their_landing_buffers_are_clear_again(dtype):
    torch.manual_seed(0)
    inputs = [torch.randn(3, 256).to(DEVICE, dtype) for _ in range(2)]
    weights = [(torch.randn(64, 256) / 16).to(DEVICE, dtype) for _ in range(2)]
    outs, landings = push_and_sum(inputs, weights)
    # as Transformers sums a row-parallel product: each rank's product in its dtype, then their sum, rounded once
    parts = [torch.nn.functional.linear(x.float(), w.float()).to(dtype) for x, w in zip(inputs, weights)]
    expected = (parts[0].float() + parts[1].float()).to(dtype)
    assert torch.equal(outs[0], outs[1])  # the same bits on both ranks
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # (a rounding of the sum)
    torch.testing.assert_close(outs[0], expected, rtol=tolerance, atol=tolerance)
    for buffer in landings:
        assert torch.equal(buffer, landing(buffer.numel(), dtype))


def test_a_negative_zero_part_is_pushed_as_positive_zero_so_it_lands():
    """-0.0 marks "not landed": a part that rounds to -0.0 (here a tiny negative product in float16) must arrive as
    +0.0, in both copies, or the other rank would wait for it forever (and the two ranks' sums could differ)."""
    dtype = torch.float16
    inputs = [torch.zeros(1, 64, dtype=dtype, device=DEVICE) for _ in range(2)]
    inputs[0][0, 0] = 1e-4
    weights = [torch.zeros(32, 64, dtype=dtype, device=DEVICE) for _ in range(2)]
    weights[0][:, 0] = -1e-4  # 1e-4 * -1e-4 = -1e-8: float16's -0.0
    rows, width = 1, 32
    theirs = landing(rows * width, dtype).view(rows, width)
    out = torch.empty(rows, width, dtype=dtype, device=DEVICE)
    launch = _narrow_products.launch_for(weights[0])
    _narrow_products.narrow_linear(inputs[0], weights[0], None, launch, out=out, peer=theirs)
    assert torch.equal(out.view(torch.int16), torch.zeros_like(theirs))  # +0.0, not -0.0's bits
    assert torch.equal(theirs, torch.zeros_like(theirs))
    # and without the push, the same product is -0.0 (what the test is about)
    plain = _narrow_products.narrow_linear(inputs[0], weights[0], None, launch)
    assert (plain.view(torch.int16) == _pushed_sums.negative_zero(dtype)).all()
