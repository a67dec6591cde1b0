"""Weight products of a decode step, a few rows against a whole weight, as one Triton kernel of ours.

A decode step multiplies one row per sequence by every weight of the model, so its products read the weights once
and compute almost nothing: their time is bytes over bandwidth. cuBLAS picks split-K kernels with a reduce pass of
their own for the square products of such a step, and a whole step of Mistral-7B's reaches 86-88% of an H100's
copy bandwidth (`benchmarks.narrow_products`). Here one program owns ``BLOCK_N`` rows of the weight and walks their
whole length in steps of ``BLOCK_K`` columns, the tiles pipelined by Triton: no split, no reduce, every weight
byte read once, in rows of contiguous columns. The few input rows (padded to 16, the tensor cores' narrowest
tile) are re-read from cache by each program.

On Hopper GPUs the kernel is a programmatic dependent launch (`_ring_decode.dependent_launch`): it may start while
the kernel before it finishes, and waits for it (``gdc_wait``) before reading its input. In a captured step of
Mistral-7B (B=1 and 8) that gave 2% over the same kernel launched plainly, which gave 1.5-2% over cuBLAS
(`results/h100/README.md`). It lets the next kernel start as soon as it has waited (only a kernel launched the
same way starts early on that, and it too waits before reading). On CUDA before Hopper, and on ROCm, products keep
cuBLAS: the launch rule was measured on an H100.

Products accumulate in float32; float32 inputs multiply in IEEE float32 (not TF32), so the parity tests that run
float32 models run this kernel's code (its float32 variant: no tensor-core products, steps of half as many
columns); bfloat16 is checked against float32 products on the GPU. CPU tests run the same kernel through Triton's
interpreter (``TRITON_INTERPRET=1`` before Triton is imported, as ``tests/conftest.py`` sets without a GPU).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import _kernels
from ._ring_decode import _capability, _dependent_launch, _multiprocessors, compile_errors

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: cuBLAS (or the CPU's BLAS) multiplies
    triton = tl = None


# Input rows a product of this kind takes (padded to one tile of 16; more rows are no longer bandwidth-bound alone).
MAX_ROWS = 16

# How the kernel is launched, chosen on an H100 by `benchmarks.narrow_products`' grid (Mistral-7B's products and one
# tensor-parallel rank's, B=1 and 8): (weight rows per program, bytes of a row per inner step, warps, stages), by
# how many programs the weight gives. A weight whose programs of 32 rows fit in one wave over the multiprocessors
# (o, down) takes long steps and deep pipelines; one that fits a wave in programs of 64 rows (q/k/v) takes those;
# a large one (gate/up, the head) many short programs. Each within 3% of the grid's best for its shape (most within
# 1%); cuBLAS took up to 16% longer than that best (o), and 1% less on one (a rank's gate/up).
_ONE_WAVE, _ONE_WAVE_WIDE, _MANY_WAVES = (32, 512, 4, 5), (64, 512, 4, 4), (32, 256, 4, 3)


if tl is not None:

    @triton.jit
    def _narrow_product(
        X, W, BIAS, Y, rows, columns,
        stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        # One program: weight rows [n0, n0 + BLOCK_N) against every input row, over all ``columns`` (a multiple of
        # BLOCK_K, as the weight's row count is of BLOCK_N: the launcher checks, so only input rows are masked).
        n0 = tl.program_id(0) * BLOCK_N
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        real = offs_m[:, None] < rows
        if PDL:  # launched before the kernel that writes X finished: wait for it here, then let the next start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x_at = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_at = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, columns, BLOCK_K):
            x = tl.load(x_at, mask=real, other=0.0)
            w = tl.load(w_at)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            x_at += BLOCK_K
            w_at += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
        y_at = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_at, acc.to(Y.dtype.element_ty), mask=real)


def launch_for(weight: torch.Tensor, bias: torch.Tensor | None = None) -> list[int] | None:
    """How to launch the kernel for ``weight`` (``[block_n, block_k, num_warps, num_stages]``), or None where it
    does not apply: switched off or not on this device (CUDA before Hopper, ROCm), Triton absent, under autocast, a
    weight that is not a plain 2-D tensor with contiguous rows of a floating dtype (a bias of another dtype or
    length), or sizes its tiles do not divide."""
    switch = _kernels._narrow_products
    if tl is None or not switch.enabled or switch.unbuildable or weight.device.type not in switch.devices:
        return None
    if torch.amp.is_autocast_available(weight.device.type) and torch.is_autocast_enabled(weight.device.type):
        return None  # autocast casts ``F.linear``'s operands to its dtype: leave the product to it
    if type(weight.data) is not torch.Tensor or weight.dim() != 2 or weight.stride(-1) != 1:
        return None
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    out_features, in_features = weight.shape
    if bias is not None and (bias.dtype != weight.dtype or bias.shape != (out_features,) or bias.stride(0) != 1):
        return None  # (``F.linear`` would broadcast a bias of one element; the kernel reads one per row)
    if weight.is_cuda and (torch.version.hip is not None or _capability(weight.device) < 9):
        return None  # the launch rule was measured on Hopper; elsewhere cuBLAS (and no shared memory to spare)
    programs = _multiprocessors(weight.device)
    if out_features // 32 <= programs:
        block_n, row_bytes, warps, stages = _ONE_WAVE
    elif out_features // 64 <= programs:
        block_n, row_bytes, warps, stages = _ONE_WAVE_WIDE
    else:
        block_n, row_bytes, warps, stages = _MANY_WAVES
    block_k = row_bytes // weight.dtype.itemsize
    while block_k > 16 and in_features % block_k:
        block_k //= 2
    while block_n > 16 and out_features % block_n:
        block_n //= 2
    if in_features % block_k or out_features % block_n:
        return None
    return [block_n, block_k, warps, stages]


def product(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int] | None):
    """``F.linear(input, weight, bias)``: by our kernel where ``launch`` (`launch_for` the weight) is given and the
    input has at most `MAX_ROWS` rows of the weight's dtype, else by ``F.linear``. Traced by the compiler: the
    checks are on shapes and dtypes only."""
    if launch is None or input.dtype != weight.dtype or input.numel() > MAX_ROWS * input.shape[-1]:
        return F.linear(input, weight, bias)
    return torch.ops.hf_rolling_cache.narrow_linear(input, weight, bias, launch)


@torch.library.custom_op("hf_rolling_cache::narrow_linear", mutates_args=())
def narrow_linear_op(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int]
) -> torch.Tensor:
    """`narrow_linear` as an operator the compiler keeps whole. If Triton cannot build the kernel for this GPU,
    a warning says so once and products go to ``F.linear`` from then on (in the compiled code too)."""
    switch = _kernels._narrow_products
    if not switch.unbuildable:
        on_device = torch.cuda.device(input.device) if input.is_cuda else contextlib.nullcontext()
        try:
            with on_device:
                return narrow_linear(input, weight, bias, launch)
        except compile_errors() as error:
            switch.cannot_build(error, "decode product kernel", "multiplying with cuBLAS")
    return F.linear(input, weight, bias)


@narrow_linear_op.register_fake
def _(input, weight, bias, launch):
    return input.new_empty(*input.shape[:-1], weight.shape[0])


def narrow_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int]
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` for an input of at most `MAX_ROWS` rows by our kernel, launched as
    ``launch`` says (`launch_for`; the benchmark's grid passes its own), whose tiles divide the weight."""
    block_n, block_k, num_warps, num_stages = launch
    columns = weight.shape[1]
    x = input.reshape(-1, columns)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, out_features = x.shape[0], weight.shape[0]
    assert rows <= MAX_ROWS and out_features % block_n == 0 and columns % block_k == 0, (rows, weight.shape, launch)
    out = x.new_empty(rows, out_features)
    _narrow_product[(out_features // block_n,)](
        x, weight, bias if bias is not None else weight, out, rows, columns,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=weight.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
        **_dependent_launch(weight),
    )
    return out.view(*input.shape[:-1], out_features)
