"""Attention kernels for the three phases, each exact against the step plan's xFormers mask.

- Prefill phases, packed tokens ``[T, H_q, D]`` against packed keys ``[S, H_kv, D]``: on CUDA xFormers'
  memory-efficient attention in its 5-D grouped layout (no copy of K/V per query head), with the operator chosen
  once per mask type rather than dispatched on every call; elsewhere, or where xFormers cannot run, an exact
  float32 computation from the materialized mask (the oracle the tests also use).
- Decode, one query per sequence against its ring ``[B, W, H_kv, D]``: PyTorch's scaled_dot_product_attention with
  the decode mask's per-sequence key lengths as a key-padding mask (the same semantics as
  ``BlockDiagonalCausalWithOffsetPaddedKeysMask``; several times faster than xFormers' padded-keys call at B=1),
  on every device, so CPU tests run the very code the GPU runs.

Grouped query heads share their kv head: query head h reads kv head ``h // (H_q // H_kv)``, as in repeat_kv.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

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


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Use the exact dense kernel for prefill phases even on CUDA (to compare the two paths)."""
    previous, _xformers.enabled = _xformers.enabled, False
    try:
        yield
    finally:
        _xformers.enabled = previous


def attend_packed(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, scaling: float
) -> torch.Tensor:
    """Prefill attention over packed tokens with the plan's block-diagonal mask: ``[T, H_q, D]`` out."""
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
    v = values.view(1, values.shape[0], kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
    out = _xformers(q, k, v, plan.mask(query.device), scaling)
    return out.view(num_queries, query_heads, head_dim)


def dense_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Exact attention from a materialized mask (``[T, S]`` of 0 / -inf), computed in float32."""
    num_queries, query_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.view(num_queries, kv_heads, query_heads // kv_heads, head_dim).float()
    scores = torch.einsum("thgd,shd->hgts", grouped, keys.float()) * scaling + bias
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgts,shd->thgd", probs, values.float())
    return out.reshape(num_queries, query_heads, head_dim).to(query.dtype)


def attend_ring(
    query: torch.Tensor,
    ring_keys: torch.Tensor,
    ring_values: torch.Tensor,
    key_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Decode attention: ``query [B, H_q, 1, D]`` over each sequence's ring ``[B, W, H_kv, D]``.

    ``key_mask`` is ``[B, 1, 1, W]``: True (or a 0 bias) for the slots a sequence has filled, False (or -inf) for
    the others; ``None`` when every ring is full. Returns ``[B, 1, H_q, D]``.
    """
    keys = ring_keys.transpose(1, 2)  # [B, H_kv, W, D], a view
    values = ring_values.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=key_mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
    )
    return out.transpose(1, 2)
