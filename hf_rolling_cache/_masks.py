"""xFormers block-diagonal masks for the three phases of
"KV Caching in Mistral with Transformers and xFormers", behind one small interface.

xFormers' ``make_local_attention*`` methods differ from class to class; these helpers hide that, so the step plan
only says which phase it is in and with which seqlens. The mask classes are plain value objects that work on CPU;
only xFormers' attention kernels need CUDA.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

try:
    # xFormers logs a warning at import when its compiled extension does not match the installed torch (always the
    # case on CPU). The mask classes are pure Python and need none of it, so keep that noise out of CPU runs; on a
    # GPU machine the warning matters and is left alone.
    _xformers_logger = logging.getLogger("xformers")
    _previous_level = _xformers_logger.level
    if not torch.cuda.is_available():
        _xformers_logger.setLevel(logging.ERROR)
    try:
        from xformers.ops.fmha.attn_bias import (
            AttentionBias,
            BlockDiagonalCausalMask,
            BlockDiagonalCausalWithOffsetPaddedKeysMask,
            BlockDiagonalMask,
        )
    finally:
        _xformers_logger.setLevel(_previous_level)
except ImportError as error:  # pragma: no cover - exercised only where xformers is missing
    raise ImportError(
        "hf_rolling_cache needs xFormers for its attention masks: `pip install xformers` "
        "(on a CPU-only machine the mask classes work without its CUDA kernels)."
    ) from error

__all__ = [
    "AttentionBias",
    "decode_mask",
    "first_chunk_mask",
    "later_chunk_mask",
]


def first_chunk_mask(
    q_seqlens: Sequence[int], window: int | None, device: torch.device | None = None
) -> AttentionBias:
    """First prefill chunk: nothing cached, each token attends to itself and the ``window - 1`` before it (all
    before it, for a global layer: ``window=None``)."""
    causal = BlockDiagonalCausalMask.from_seqlens(q_seqlens, device=device)
    return causal if window is None else causal.make_local_attention(window)


def later_chunk_mask(
    q_seqlens: Sequence[int], kv_seqlens: Sequence[int], window: int | None, device: torch.device | None = None
) -> AttentionBias:
    """A later prefill chunk over [unrotated cache ++ chunk]: queries line up with the keys from the bottom right."""
    blocks = BlockDiagonalMask.from_seqlens(q_seqlens, kv_seqlens, device=device)
    return blocks.make_causal_from_bottomright() if window is None else blocks.make_local_attention_from_bottomright(
        window
    )


def decode_mask(kv_seqlens: Sequence[int], key_span: int, device: torch.device | None = None) -> AttentionBias:
    """Decode: one query per sequence over ``key_span`` slots of its storage (a ring's whole window), the first
    ``kv_seqlens[b]`` valid.

    Ring order does not matter here: the single query attends to every valid slot, and rotary embeddings were
    applied before the keys were written.
    """
    return BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[1] * len(kv_seqlens), kv_padding=key_span, kv_seqlen=list(kv_seqlens), device=device
    )


_DECODE_TEMPLATES: dict[tuple, BlockDiagonalCausalWithOffsetPaddedKeysMask] = {}


def decode_mask_of(kv_seqlens: torch.Tensor, key_span: int) -> BlockDiagonalCausalWithOffsetPaddedKeysMask:
    """`decode_mask` with the key lengths as a device tensor (``[B]`` int32) instead of host ints, for a step
    captured in a CUDA graph: the lengths change from replay to replay inside the tensor, while the mask's host-side
    sizes (one query per row, ``key_span`` slots, at most ``key_span`` keys) stay fixed. The host-side part is made
    once per shape and device (its small tensors are copied from the host, which a capture would not allow), on the
    first, eager step.

    Only the device ``seqlen`` is true: the host-side fields (``seqlen_py``, ``min_seqlen``, ``max_seqlen``) stay at
    ``key_span``, an upper bound, which is all xFormers' split-K kernel reads of them. Hand this mask to nothing
    else: ``materialize`` or another operator would see every slot as valid."""
    shape = (kv_seqlens.numel(), key_span, kv_seqlens.device)
    template = _DECODE_TEMPLATES.get(shape)
    if template is None:
        template = _DECODE_TEMPLATES[shape] = decode_mask([key_span] * shape[0], key_span, device=shape[2])
    return dataclasses.replace(template, k_seqinfo=dataclasses.replace(template.k_seqinfo, seqlen=kv_seqlens))
