"""Attention kernels for the three phases, each exact against the step plan's xFormers mask.

- Prefill phases, packed queries ``[T, H_q, D]`` against packed keys ``[S, H_kv, D]``: on CUDA xFormers' attention
  in its 5-D grouped layout (no copy of K/V per query head), its operator chosen once per mask type (the compiled
  prefill's kernels first: `_compiled_prefill`); elsewhere, exact float32 over the materialized mask (the oracle).
- Decode, one query per sequence against its ring ``[B, W, H_kv, D]``: on CUDA, where Triton is installed, our own
  split-K kernels (`_ring_decode`), which also write the step's token (the decode mask's semantics: each row's
  first ``kv_seqlens[b]`` slots, as ``BlockDiagonalCausalWithOffsetPaddedKeysMask``); elsewhere, or for a ring with
  slack, the step's write and then PyTorch's scaled_dot_product_attention with a key-padding mask (several times
  faster than xFormers' padded-keys call at B=1). CPU tests run both: SDPA as it runs, the Triton kernels through
  Triton's interpreter.
- Decode over an 8-bit ring (`_fp8.Fp8KVLayer`): by default the ring is dequantized and read as above (exact, every
  device). On CUDA, where xFormers' Triton split-K kernel runs, `attend_ring_fp8` instead hands it the codes and
  scales, which it dequantizes as it reads them (the same float16 arithmetic, so the same keys and values).
- Score caps (``softcap``: Gemma 2) and attention sinks (``sinks``: GPT-OSS) are in neither xFormers nor SDPA:
  layers that have them attend with plain tensor products, in float32, exactly as Transformers' eager path does:
  decode over the ring, prefill sequence by sequence in blocks of queries on CUDA (no ``[T, S]`` mask of the whole
  batch), or with the materialized mask elsewhere.

Grouped query heads share their kv head: query head h reads kv head ``h // (H_q // H_kv)``, as in repeat_kv.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ._cudnn import _cudnn
from ._flex import _flex
from ._plan import StepPlan

logger = logging.getLogger(__name__)


class _XformersForward:
    """xFormers' forward operator, chosen once per mask type, dtype and head size rather than on every call."""

    def __init__(self) -> None:
        self.enabled = True
        self._ops: dict[tuple, object] = {}

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias, scaling: float):
        from xformers.ops import fmha

        inputs = fmha.Inputs(query=query, key=keys, value=values, attn_bias=bias, p=0.0, scale=scaling)
        inputs.validate_inputs()
        output_shape = inputs.normalize_bmhk()
        key = (type(bias), query.dtype, query.shape[-1], query.device)
        op = self._ops.get(key)
        if op is None:
            op = self._ops[key] = _choose_operator(fmha, inputs)
            logger.info("xFormers operator for %s: %s", type(bias).__name__, op.NAME)
        out, *_ = op.apply(inputs, needs_gradient=False)
        return out.reshape(output_shape)


def _choose_operator(fmha, inputs):
    """xFormers' own dispatch; where it refuses everything only because its compiled extension did not load
    (torch built for another CUDA), take the flash operator that runs on PyTorch's own kernels."""
    try:
        return fmha.dispatch._dispatch_fw(inputs, False)
    except NotImplementedError as refusal:
        flash = fmha.flash.FwOp
        reasons = [r for r in flash.not_supported_reasons(inputs) if "wasn't build with CUDA" not in r]
        if flash.NAME.endswith("-pt") and not reasons:
            logger.warning(
                "xFormers' compiled extension is not loaded; using its PyTorch-backed flash operator %s.", flash.NAME
            )
            return flash
        raise refusal


_xformers = _XformersForward()


class _Fp8Decode:
    """Whether xFormers' split-K kernel may read 8-bit rings: on unless switched off (`exact_kernels`). What it
    refuses (a dtype, head size or GPU it does not support) is asked once per dtype, head size, query group and
    device, and warned about once; those inputs are then dequantized instead."""

    def __init__(self) -> None:
        self.enabled = True
        self._refusals: dict[tuple, list[str]] = {}

    def refusals(self, inputs) -> list[str]:
        from xformers.ops.fmha import triton_splitk

        query = inputs.query
        key = (query.dtype, query.shape[-1], query.shape[-2], query.device)
        if key not in self._refusals:
            self._refusals[key] = reasons = triton_splitk.FwOp.not_supported_reasons(inputs)
            if reasons:
                logger.warning("xFormers' split-K kernel cannot read the fp8 ring here (%s); dequantizing instead.",
                               "; ".join(reasons))
        return self._refusals[key]


_fp8_decode = _Fp8Decode()


class _OurKernel:
    """Whether one of our Triton kernels runs: ``enabled`` unless switched off (`exact_kernels`, its context below);
    ``devices``: where it runs (tests add "cpu": Triton's interpreter); ``unbuildable``: not buildable here."""

    def __init__(self) -> None:
        self.enabled, self.devices, self.unbuildable = True, ("cuda",), False

    def cannot_build(self, error: Exception, kernels: str, instead: str) -> None:
        """Triton refused to build ``kernels`` for this GPU: off for the process, and say so once."""
        self.unbuildable = True
        logger.warning("Triton could not build the %s for this GPU (%s: %s); %s instead.",
                       kernels, type(error).__name__, error, instead)

    @contextlib.contextmanager
    def switched(self, enabled: bool) -> Iterator[None]:
        previous, self.enabled = self.enabled, enabled
        try:
            yield
        finally:
            self.enabled = previous


_ring_decode = _OurKernel()  # decode attention over a ring, the step's write folded in (`_ring_decode`)
_narrow_products = _OurKernel()  # the compiled step's weight products, read when its layers are swapped in


def ring_decode_kernel(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Decode with (True) or without (False: the write, then SDPA) the Triton kernels inside the block; a step
    captured earlier replays what it was captured with."""
    return _ring_decode.switched(enabled)


def narrow_product_kernel(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Compiled decode steps multiply with (True) or without (False: cuBLAS) our product kernel inside the block;
    a step captured earlier replays what it was captured with."""
    return _narrow_products.switched(enabled)


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Prefill by the exact dense kernel even on CUDA (not xFormers, cuDNN or FlexAttention), decode by a separate
    write and SDPA, products by cuBLAS, 8-bit rings dequantized (to compare the paths). A decode step captured
    earlier (`use_cuda_graphs`) replays the kernels it was captured with: release the graphs first to compare."""
    switches = (_xformers, _fp8_decode, _ring_decode, _narrow_products, _flex, _cudnn)
    previous = [switch.enabled for switch in switches]
    for switch in switches:
        switch.enabled = False
    try:
        yield
    finally:
        for switch, enabled in zip(switches, previous):
            switch.enabled = enabled


def attend_packed(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    plan: StepPlan,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill attention over packed tokens with the plan's block-diagonal mask: ``[T, H_q, D]`` out."""
    if softcap is not None or sinks is not None:
        if query.is_cuda:
            return blockwise_attention(query, keys, values, plan, scaling, softcap, sinks)
        return dense_attention(query, keys, values, plan.dense_mask(query.device), scaling, softcap, sinks)
    if query.is_cuda and _xformers.enabled:
        try:
            return _grouped_xformers(query, keys, values, plan, scaling)
        except (ImportError, NotImplementedError) as error:
            _xformers.enabled = False
            logger.warning("xFormers attention cannot run here (%s); using the exact fallback kernel.", error)
    return dense_attention(query, keys, values, plan.dense_mask(query.device), scaling)


def _grouped_xformers(query, keys, values, plan, scaling):
    num_queries, query_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = query_heads // kv_heads
    q = query.view(1, num_queries, kv_heads, group, head_dim)  # [1, M, G, H, K]
    k = keys.view(1, keys.shape[0], kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
    v = values.view(1, values.shape[0], kv_heads, 1, values.shape[-1]).expand(-1, -1, -1, group, -1)
    out = _xformers(q, k, v, plan.mask(query.device), scaling)
    return out.view(num_queries, query_heads, values.shape[-1])


def dense_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention from a materialized mask (``[T, S]`` of 0 / -inf), computed in float32."""
    num_queries, query_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.view(num_queries, kv_heads, query_heads // kv_heads, head_dim).float()
    scores = torch.einsum("thgd,shd->hgts", grouped, keys.float()) * scaling  # [H_kv, G, T, S]
    probs = _probabilities(_capped(scores, softcap) + bias, sinks)
    out = torch.einsum("hgts,shd->thgd", probs, values.float())
    return out.reshape(num_queries, query_heads, values.shape[-1]).to(query.dtype)


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _probabilities(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension of ``[..., H_kv, G, rows, S]`` scores; a sink (one logit per query head,
    ``[H_q]``) joins each row's denominator and is dropped after, as in Transformers' GPT-OSS."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    kv_heads, group = scores.shape[-4], scores.shape[-3]
    sink = sinks.float().view(kv_heads, group, 1, 1).expand(*scores.shape[:-1], 1)
    combined = torch.cat([scores, sink], dim=-1)
    return torch.softmax(combined, dim=-1)[..., :-1]


def blockwise_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    plan: StepPlan,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    block: int = 1024,
) -> torch.Tensor:
    """The exact float32 attention, sequence by sequence and ``block`` queries at a time, with the plan's mask
    written from positions (the block-diagonal masks' meaning: queries line up with keys from the bottom right,
    and see the ``window`` keys up to their own). Memory: one ``[H_q, block, kv_seqlen]`` score tile."""
    num_queries, query_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    out = query.new_empty(num_queries, query_heads, values.shape[-1])
    q_start = k_start = 0
    for q_len, kv_len in zip(plan.q_seqlens, plan.kv_seqlens):
        key_rows = keys[k_start : k_start + kv_len].float()
        value_rows = values[k_start : k_start + kv_len].float()
        key_positions = torch.arange(kv_len, device=query.device)
        for first in range(0, q_len, block):
            last = min(first + block, q_len)
            rows = query[q_start + first : q_start + last].float().view(-1, kv_heads, query_heads // kv_heads, head_dim)
            scores = _capped(torch.einsum("thgd,shd->hgts", rows, key_rows) * scaling, softcap)
            query_positions = torch.arange(first, last, device=query.device) + (kv_len - q_len)
            visible = key_positions[None, :] <= query_positions[:, None]
            if plan.window is not None:
                visible &= key_positions[None, :] > query_positions[:, None] - plan.window
            scores = scores.masked_fill(~visible, -torch.inf)
            tile = torch.einsum("hgts,shd->thgd", _probabilities(scores, sinks), value_rows)
            out[q_start + first : q_start + last] = tile.reshape(-1, query_heads, values.shape[-1]).to(query.dtype)
        q_start += q_len
        k_start += kv_len
    return out


def attend_ring(
    query: torch.Tensor,
    ring_keys: torch.Tensor,
    ring_values: torch.Tensor,
    key_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: ``query [B, H_q, 1, D]`` over each sequence's slots ``[B, S, H_kv, D]`` (a ring's window,
    or a global layer's first S slots).

    ``key_mask`` is ``[B, 1, 1, S]``: True (or a 0 bias) for the slots a sequence has filled, False (or -inf) for
    the others; ``None`` when every slot is filled. Returns ``[B, 1, H_q, D]``.
    """
    if softcap is not None or sinks is not None:
        return _ring_products(query, ring_keys, ring_values, key_mask, scaling, softcap, sinks)
    keys = ring_keys.transpose(1, 2)  # [B, H_kv, S, D], a view
    values = ring_values.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=key_mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
    )
    return out.transpose(1, 2)


def _ring_products(query, ring_keys, ring_values, key_mask, scaling, softcap, sinks):
    """Decode attention with a score cap or sinks: float32 products over the ring, as Transformers' eager path."""
    batch, query_heads, _, head_dim = query.shape
    kv_heads = ring_keys.shape[2]
    grouped = query.view(batch, kv_heads, query_heads // kv_heads, 1, head_dim).float()  # [B, H_kv, G, 1, D]
    scores = torch.einsum("bhgqd,bshd->bhgqs", grouped, ring_keys.float()) * scaling
    scores = _capped(scores, softcap)
    if key_mask is not None:
        bias = key_mask if key_mask.dtype != torch.bool else torch.zeros(
            key_mask.shape, device=key_mask.device).masked_fill_(~key_mask, -torch.inf)
        scores = scores + bias.float().view(batch, 1, 1, 1, -1)
    out = torch.einsum("bhgqs,bshd->bqhgd", _probabilities(scores, sinks), ring_values.float())
    return out.reshape(batch, 1, query_heads, ring_values.shape[-1]).to(query.dtype)


def ring_kernel_applies(query: torch.Tensor, layer, plan, softcap: float | None, sinks: torch.Tensor | None) -> bool:
    """Whether a decode step writes and attends with our Triton kernels (`_ring_decode`): on CUDA with Triton, for
    batches whose rows' kv heads do not fill the GPU alone (the kernels split each row's slots; SDPA reads a large
    batch as fast), a layer of the model's dtype (an 8-bit ring has its own path), no score cap or sinks, over a
    prefix of each row's slots (a ring without slack, or a global layer), head sizes up to 256."""
    if not (query.device.type in _ring_decode.devices and _ring_decode.enabled and not _ring_decode.unbuildable
            and softcap is None and sinks is None):
        return False
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or layer.slot_keys.dtype != query.dtype:
        return False
    if not _reads_a_prefix(plan):
        return False
    if max(query.shape[-1], layer.slot_values.shape[-1]) > 256 or not _ring_decode_module().kernel_available():
        return False
    return _ring_decode_module().splits_rows(query.shape[0], layer.slot_keys.shape[2], query.device)


def ring_attention(query, new_keys, new_values, slot_keys, slot_values, rows, keep, kv_seqlens, key_span, scaling):
    """`_ring_decode.ring_attention` (Triton imported on first use), or ``None`` where Triton cannot compile the
    kernels for this GPU: then they are switched off for the process, with a warning, and the caller writes and
    attends with SDPA (if the first kernel ran before the second failed to build, it wrote the same values the
    caller's write then writes again, and its partial results are dropped)."""
    module = _ring_decode_module()
    try:
        return module.ring_attention(
            query, new_keys, new_values, slot_keys, slot_values, rows, keep, kv_seqlens, key_span, scaling
        )
    except module.compile_errors() as error:
        _ring_decode.cannot_build(error, "decode kernels", "decoding with SDPA")
        return None


def _reads_a_prefix(plan) -> bool:
    """A row's attended slots are its first ``kv_seqlens[b]``: a ring without slack (filled in order, then every
    slot) or a global layer, what kernels taking key lengths need; a ring with slack is not."""
    return plan.window is None or plan.capacity == plan.window


def _ring_decode_module():
    from . import _ring_decode

    return _ring_decode


def fp8_kernel_applies(query: torch.Tensor, plan) -> bool:
    """Whether a decode step may read an 8-bit ring with xFormers' split-K kernel: on CUDA with Triton, over a
    prefix of each row's slots (a ring without slack, or a global layer). The step may be planned on the host (an
    eager step: the mask from its seqlens) or on the device (a CUDA graph's: the key lengths as a device tensor).
    Score caps and sinks are the caller's to exclude."""
    if not (query.is_cuda and _fp8_decode.enabled and query.dtype in (torch.float16, torch.bfloat16)):
        return False  # (the kernel refuses float32 queries: those read the ring dequantized)
    if not _reads_a_prefix(plan):
        return False
    import xformers

    return xformers._is_triton_available()


def attend_ring_fp8(
    query: torch.Tensor, storage: tuple[torch.Tensor, ...], plan, scaling: float
) -> torch.Tensor | None:
    """Decode attention read straight from an 8-bit ring by xFormers' split-K kernel: ``query [B, H_q, 1, D]``,
    ``storage`` as `Fp8KVLayer.attended_fp8` gives it (int32 codes ``[B, C, H_kv, D // 4]`` and scale-shifts
    ``[B, C, H_kv]``, keys then values). Returns ``[B, 1, H_q, D]``, or ``None`` where the kernel refuses the
    inputs (then the caller dequantizes).

    Grouped query heads read their kv head through a stride-0 expansion (no copy), and the mask is the decode
    mask over all ``C`` slots of a row (the storage's row stride), the first ``kv_seqlens[b]`` valid, as the plan
    gives it (``decode_mask_over``: for a step planned on the device, CUDA graphs, its key lengths are the step's
    device tensor). The kernel takes float16 and bfloat16 queries; it refuses float32.
    """
    from xformers.ops.fmha import triton_splitk

    key_codes, key_scales, value_codes, value_scales = storage
    batch, slots, kv_heads, _ = key_codes.shape
    query_heads, head_dim = query.shape[1], query.shape[-1]
    group = query_heads // kv_heads

    def per_group(packed: torch.Tensor) -> torch.Tensor:  # [B, C, H_kv, *X] -> [1, B * C, H_kv, G, *X], a view
        grouped = packed.reshape(1, batch * slots, kv_heads, 1, *packed.shape[3:])
        return grouped.expand(1, batch * slots, kv_heads, group, *packed.shape[3:])

    mask = plan.decode_mask_over(slots, query.device)  # a DeviceDecodePlan's key lengths stay on the device
    inputs = triton_splitk.InputsFp8(
        query=query.transpose(1, 2).reshape(1, batch, kv_heads, group, head_dim),  # [1, B * 1, G, H, K]
        key=per_group(key_codes),
        value=per_group(value_codes),
        attn_bias=mask,
        p=0.0,
        scale=scaling,
        k_fp8_scale_shift=per_group(key_scales),
        v_fp8_scale_shift=per_group(value_scales),
    )
    if _fp8_decode.refusals(inputs):
        return None
    out, _ = triton_splitk.FwOp.apply(inputs, needs_gradient=False)
    return out.reshape(batch, 1, query_heads, value_codes.shape[-1] * 4)
