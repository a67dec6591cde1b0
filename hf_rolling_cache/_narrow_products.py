"""Weight products of a decode step, a few rows against a whole weight, as one Triton kernel of ours.

A decode step multiplies one row per sequence by every weight of the model, so its products read the weights once
and compute almost nothing: their time is bytes over bandwidth. cuBLAS picks split-K kernels with a reduce pass of
their own for the square products of such a step, and a whole step of Mistral-7B's reaches 86-88% of an H100's
copy bandwidth (`benchmarks.narrow_products`). Here one program owns ``BLOCK_N`` rows of the weight and walks their
whole length in steps of ``BLOCK_K`` columns, the tiles pipelined by Triton: no split, no reduce, every weight
byte read once, in rows of contiguous columns. The few input rows (padded to 16, the tensor cores' narrowest
tile) are re-read from cache by each program.

The kernel also serves two folds of the compiled step: a SiLU MLP's ``silu(gate) * up`` computed in its fused
gate/up product's epilogue (`gated_product`, for `_fused.gated_swap`), and a residual added in a product's epilogue
(``narrow_linear_add``, made by `_fused.SameProducts` of a decoder layer's add), each rounded where the eager code
rounds; each is one elementwise kernel fewer a layer.

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
from ._pushed_sums import negative_zero

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
        X, W, BIAS, RESIDUAL, Y, PEER, rows, columns, half,
        stride_xm, stride_wn, stride_rm, stride_ym,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, PUSH: tl.constexpr,
        NEGATIVE_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        # One program: BLOCK_N weight rows against every input row, over all ``columns`` (a multiple of BLOCK_K, as
        # the weight's row count is of BLOCK_N: the launcher checks, so only input rows are masked). Plainly rows
        # [n0, n0 + BLOCK_N); GATED, output columns [j0, j0 + BLOCK_N / 2) of ``silu(gate) * up``, the gate's rows
        # (the weight's first ``half``) and the up's (the second) interleaved, so each gate row meets its up row.
        # HAS_RESIDUAL: ``residual + product``, the add that follows the product in a decoder layer. PUSH: a
        # row-parallel partial product, also stored into the peer's landing buffer PEER (`_pushed_sums`), where a
        # negative zero would read as "not landed yet": both copies carry +0.0 for it.
        offs_m = tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_N)
        if GATED:
            j0 = tl.program_id(0) * (BLOCK_N // 2)
            weight_rows = (offs_r % 2) * half + j0 + offs_r // 2
        else:
            weight_rows = tl.program_id(0) * BLOCK_N + offs_r
        offs_k = tl.arange(0, BLOCK_K)
        real = offs_m[:, None] < rows
        if PDL:  # launched before the kernel that writes X finished: wait for it here, then let the next start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x_at = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_at = W + weight_rows[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
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
            acc += tl.load(BIAS + weight_rows).to(tl.float32)[None, :]
        if GATED:
            # As Transformers' eager MLP rounds: each product, then silu(gate), then the product with up, each
            # to the output's dtype (computed in float32, as PyTorch's kernels do).
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
            gate = gate.to(Y.dtype.element_ty).to(tl.float32)
            up = up.to(Y.dtype.element_ty).to(tl.float32)
            gate = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
            y_at = Y + offs_m[:, None] * stride_ym + j0 + tl.arange(0, BLOCK_N // 2)[None, :]
            tl.store(y_at, (gate * up).to(Y.dtype.element_ty), mask=real)
        else:
            if HAS_RESIDUAL:  # rounded as the product, then the sum (PyTorch's add computes it in float32)
                residual = tl.load(RESIDUAL + offs_m[:, None] * stride_rm + weight_rows[None, :], mask=real)
                acc = acc.to(Y.dtype.element_ty).to(tl.float32) + residual.to(tl.float32)
            y = acc.to(Y.dtype.element_ty)
            if PUSH:  # on the bits (PEER's integer type): a float compare and select could be folded away
                bits = y.to(PEER.dtype.element_ty, bitcast=True)
                bits = tl.where(bits == NEGATIVE_ZERO, 0, bits).to(PEER.dtype.element_ty)
                tl.store(PEER + offs_m[:, None] * stride_ym + weight_rows[None, :], bits, mask=real)
                y = bits.to(Y.dtype.element_ty, bitcast=True)
            y_at = Y + offs_m[:, None] * stride_ym + weight_rows[None, :]
            tl.store(y_at, y, mask=real)


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
    if not _ours(input, weight, launch):
        return F.linear(input, weight, bias)
    return torch.ops.hf_rolling_cache.narrow_linear(input, weight, bias, launch)


def gated_product(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int] | None
) -> torch.Tensor:
    """``silu(gate) * up`` of a gated MLP whose gate and up weights are the first and second half of ``weight``'s
    rows (a fused group's buffer): the product and its activation in one kernel where ``launch`` applies, as
    `product` decides; else ``F.linear``, then the activation, as the MLP computes them."""
    if not _ours(input, weight, launch):
        return _gated_by_f_linear(input, weight, bias)
    return torch.ops.hf_rolling_cache.gated_narrow_linear(input, weight, bias, launch)


def _gated_by_f_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    gate, up = F.linear(input, weight, bias).chunk(2, dim=-1)
    return F.silu(gate) * up


def _ours(input: torch.Tensor, weight: torch.Tensor, launch: list[int] | None) -> bool:
    return launch is not None and input.dtype == weight.dtype and input.numel() <= MAX_ROWS * input.shape[-1]


@torch.library.custom_op("hf_rolling_cache::narrow_linear", mutates_args=())
def narrow_linear_op(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int]
) -> torch.Tensor:
    """`narrow_linear` as an operator the compiler keeps whole. If Triton cannot build the kernel for this GPU,
    a warning says so once and products go to ``F.linear`` from then on (in the compiled code too)."""
    out = _built(narrow_linear, input, weight, bias, launch)
    return F.linear(input, weight, bias) if out is None else out


@narrow_linear_op.register_fake
def _(input, weight, bias, launch):
    return input.new_empty(*input.shape[:-1], weight.shape[0])


@torch.library.custom_op("hf_rolling_cache::gated_narrow_linear", mutates_args=())
def gated_narrow_linear_op(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int]
) -> torch.Tensor:
    """`gated_product` by our kernel as an operator the compiler keeps whole (``F.linear`` and the activation if
    Triton cannot build it)."""
    out = _built(narrow_linear, input, weight, bias, launch, gated=True)
    return _gated_by_f_linear(input, weight, bias) if out is None else out


@gated_narrow_linear_op.register_fake
def _(input, weight, bias, launch):
    return input.new_empty(*input.shape[:-1], weight.shape[0] // 2)


@torch.library.custom_op("hf_rolling_cache::narrow_linear_add", mutates_args=())
def narrow_linear_add_op(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int], residual: torch.Tensor
) -> torch.Tensor:
    """``residual + narrow_linear(input, ...)``, the sum in the product's kernel: what the compiled step's pass
    (`_fused.SameProducts`) makes of a decoder layer's residual add after its product (``residual + F.linear``
    if Triton cannot build the kernel)."""
    out = _built(narrow_linear, input, weight, bias, launch, residual=residual)
    return residual + F.linear(input, weight, bias) if out is None else out


@narrow_linear_add_op.register_fake
def _(input, weight, bias, launch, residual):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


def _built(kernel, *args, **kwargs) -> torch.Tensor | None:
    """``kernel(*args)`` on the input's device, or None once Triton could not build it (warned once)."""
    switch = _kernels._narrow_products
    if switch.unbuildable:
        return None
    on_device = torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext()
    try:
        with on_device:
            return kernel(*args, **kwargs)
    except compile_errors() as error:
        switch.cannot_build(error, "decode product kernel", "multiplying with cuBLAS")
        return None


def narrow_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: list[int], gated: bool = False,
    residual: torch.Tensor | None = None, out: torch.Tensor | None = None, peer: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` for an input of at most `MAX_ROWS` rows by our kernel, launched as
    ``launch`` says (`launch_for`; the benchmark's grid passes its own), whose tiles divide the weight; ``gated``:
    `gated_product`'s ``silu(gate) * up`` of it instead, half as many columns; ``residual`` (the output's shape and
    dtype): ``residual + F.linear(...)``; ``out``: a contiguous tensor of the result's size and dtype to write it
    into (a tensor-parallel step's shared all-reduce buffer, `_all_reduce.summed_product`); ``peer``: integers of
    the output's width (the other GPU's landing buffer, `_pushed_sums`) to store the result's bits into as well,
    negative zeros stored as +0.0 in both."""
    block_n, block_k, num_warps, num_stages = launch
    columns = weight.shape[1]
    x = input.reshape(-1, columns)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, out_features = x.shape[0], weight.shape[0]
    assert rows <= MAX_ROWS and out_features % block_n == 0 and columns % block_k == 0, (rows, weight.shape, launch)
    width = out_features // 2 if gated else out_features
    if out is None:
        out = x.new_empty(rows, width)
    else:
        assert out.is_contiguous() and out.numel() == rows * width and out.dtype == x.dtype, (out.shape, out.dtype)
        out = out.view(rows, width)
    if residual is not None:
        assert not gated and residual.shape == (*input.shape[:-1], out_features) and residual.dtype == out.dtype
        residual = residual.reshape(rows, out_features)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    added = residual if residual is not None else out  # (not read without a residual)
    if peer is not None:  # (as integers of the output's width: the kernel stores bits there)
        assert not gated and residual is None and peer.is_contiguous() and peer.numel() == out.numel()
        assert not peer.dtype.is_floating_point and peer.element_size() == out.element_size()
    _narrow_product[(out_features // block_n,)](
        x, weight, bias if bias is not None else weight, added, out, peer if peer is not None else out, rows,
        columns, out_features // 2, x.stride(0), weight.stride(0), added.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, GATED=gated, PUSH=peer is not None,
        NEGATIVE_ZERO=negative_zero(out.dtype), BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, IEEE=weight.dtype == torch.float32, num_warps=num_warps,
        num_stages=num_stages, **_dependent_launch(weight),
    )
    return out.view(*input.shape[:-1], out.shape[-1])
