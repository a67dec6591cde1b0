"""Attention over packed tokens with a step plan's mask: xFormers on CUDA, an exact dense oracle elsewhere.

Shapes: queries ``[T, H_q, D]``, keys and values ``[S, H_kv, D]`` (packed, or the flat ring for decode); grouped
query heads share their kv head (query head h reads kv head ``h // (H_q // H_kv)``), as Transformers' repeat_kv.
"""

from __future__ import annotations

import logging

import torch

from ._plan import StepPlan

logger = logging.getLogger(__name__)

_xformers_cuda_ok: bool | None = None  # None: not tried yet


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, scaling: float) -> torch.Tensor:
    """Masked attention for one layer: ``[T, H_q, D]`` out."""
    if query.is_cuda and _xformers_usable():
        try:
            return _xformers_attention(query, keys, values, plan, scaling)
        except (NotImplementedError, RuntimeError, ValueError) as error:
            _disable_xformers(error)
    return dense_attention(query, keys, values, plan.dense_mask(query.device), scaling)


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


def _xformers_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, scaling: float
) -> torch.Tensor:
    """xFormers' memory-efficient attention in its 5-D grouped layout ``[1, M, G, H, K]``: no copy of K/V per head."""
    from xformers.ops import memory_efficient_attention

    num_queries, query_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = query_heads // kv_heads
    q = query.view(1, num_queries, kv_heads, group, head_dim)
    k = keys.view(1, keys.shape[0], kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
    v = values.view(1, values.shape[0], kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
    out = memory_efficient_attention(q, k, v, attn_bias=plan.mask(query.device), scale=scaling)
    return out.view(num_queries, query_heads, head_dim)


def _xformers_usable() -> bool:
    global _xformers_cuda_ok
    if _xformers_cuda_ok is None:
        try:
            import xformers.ops  # noqa: F401

            _xformers_cuda_ok = True
        except ImportError as error:
            _disable_xformers(error)
    return bool(_xformers_cuda_ok)


def _disable_xformers(error: BaseException) -> None:
    """Fall back for the rest of the process, once, with a warning that says why."""
    global _xformers_cuda_ok
    _xformers_cuda_ok = False
    logger.warning("xFormers attention is unavailable here (%s); using the exact fallback kernel.", error)
