"""Prefill chunks by PyTorch's FlexAttention, in the compiled prefill (`use_cuda_graphs(compile_prefill=True)`).

Every mask of the seed's prefill phases gives each packed query one contiguous range of the packed keys: its own
sequence's keys (held ones oldest first, then the chunk's), from the window's oldest visible position up to itself
("KV Caching in Mistral with Transformers and xFormers": ``make_local_attention`` and
``make_local_attention_from_bottomright``). So the whole mask is two integers per query, ``first`` and ``last``,
and its 128 x 128 tiles are full, partial or skipped from those alone: `block_mask` builds FlexAttention's
``BlockMask`` from them directly (never the ``[T, S]`` mask). On an H100 a 32k-token prompt's attention in a 7B
model takes 0.22 s this way against 0.27 s by xFormers' flash operator (measured, `benchmarks.prefill_attention`).

FlexAttention is compiled once per process (seconds), so it serves only the compiled prefill, which has asked for
a warm-up, and there only where cuDNN's fused attention does not (`_cudnn`: cudnn-frontend not installed, or
refused); everywhere else prefill stays with xFormers, as it does in fp32 (the dtype of the exactness tests, which
keep checking the kernels they always checked) and for chunks under 128 tokens (`applies`).
"""

from __future__ import annotations

import torch

from ._compiled_prefill import KernelSwitch, inside
from ._plan import StepPlan

BLOCK = 128  # FlexAttention's tile of queries and keys


class _FlexPrefill(KernelSwitch):
    """Whether prefill chunks go to FlexAttention: in the compiled prefill only (`_compiled_prefill.inside`), where
    cuDNN does not run them (`_cudnn`), unless switched off or refused (`KernelSwitch`)."""

    def __init__(self) -> None:
        super().__init__("FlexAttention")
        self._compiled = None

    def attention(self):
        if self._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            # its token and tile dimensions marked dynamic at each call (`flex_packed`): one compilation serves
            # every chunk length, while head counts and sizes stay static
            self._compiled = torch.compile(flex_attention)
        return self._compiled


_flex = _FlexPrefill()


def applies(query: torch.Tensor, softcap: float | None, sinks: torch.Tensor | None) -> bool:
    """Inside the compiled prefill, for inference only (`flex_packed` hands detached tensors to the kernel), for a
    chunk of at least one tile of queries: a shorter one gains nothing, and compiled first (with PyTorch 2.11 on an
    H100) FlexAttention found no kernel configuration for it, and would have been refused from then on."""
    return inside(query, softcap, sinks) and _flex.takes(query) and query.shape[0] >= BLOCK


def key_ranges(plan: StepPlan, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Packed query t attends to packed keys ``first[t] ..= last[t]`` (int32, on ``device``): the queries of a
    sequence line up with its keys from the bottom right (``kv_seqlens[b] - q_seqlens[b]`` keys held before them),
    each seeing itself and the ``window - 1`` keys before it, or every earlier key of its sequence (``window=None``).
    Computed where they are used, from one small copy of the sequence lengths: no host work per token."""
    lengths = torch.tensor([plan.q_seqlens, plan.kv_seqlens], dtype=torch.int32).to(device, non_blocking=True)
    q_seqlens, kv_seqlens = lengths[0], lengths[1]
    key_starts = torch.cumsum(kv_seqlens, 0, dtype=torch.int32) - kv_seqlens
    query_starts = torch.cumsum(q_seqlens, 0, dtype=torch.int32) - q_seqlens
    sequence = torch.repeat_interleave(torch.arange(plan.batch_size, device=device), q_seqlens,
                                       output_size=plan.num_queries)  # (sized on the host: no wait for the device)
    within = torch.arange(plan.num_queries, dtype=torch.int32, device=device) - query_starts[sequence]
    last = key_starts[sequence] + (kv_seqlens - q_seqlens)[sequence] + within
    first = key_starts[sequence]
    if plan.window is not None:
        first = torch.maximum(first, last - (plan.window - 1))
    return first, last


def block_mask(plan: StepPlan, device: torch.device):
    """FlexAttention's ``BlockMask`` of a prefill plan and the key bounds its mask function reads (``first``,
    ``last``, padded to whole tiles), made once per plan and device (shared by its layers)."""
    key = ("flex_block_mask", device)
    if key not in plan._per_device:
        plan._per_device[key] = _block_mask(plan, device)
    return plan._per_device[key]


def _block_mask(plan: StepPlan, device: torch.device):
    """Built on ``device`` by a few small kernels, queued like the layers' (the host never waits for them)."""
    from torch.nn.attention.flex_attention import BlockMask

    first, last = key_ranges(plan, device)
    num_queries, num_keys = plan.num_queries, plan.num_keys
    query_blocks, key_blocks = -(-num_queries // BLOCK), -(-num_keys // BLOCK)
    pad = query_blocks * BLOCK - num_queries
    # a tile row's queries: the widest range any of them sees (any key there: a tile to visit), and the range all
    # of them see (a tile inside it needs no mask); the queries padding the last row repeat its last query
    tile_first = torch.cat([first, first[-1:].expand(pad)]).view(-1, BLOCK)
    tile_last = torch.cat([last, last[-1:].expand(pad)]).view(-1, BLOCK)
    key_first = torch.arange(key_blocks, dtype=torch.int32, device=device) * BLOCK
    key_last = key_first + BLOCK - 1
    visits = (key_first <= tile_last.amax(1, keepdim=True)) & (key_last >= tile_first.amin(1, keepdim=True))
    full = (key_first >= tile_first.amax(1, keepdim=True)) & (key_last <= tile_last.amin(1, keepdim=True))
    if pad:
        full[-1] = False  # a last, partial tile of queries: masked
    partial = visits & ~full
    counts, indices = _block_list(partial)
    full_counts, full_indices = _block_list(full)
    # queries padding the last tile see no key (the mask reads first/last there)
    first_key = torch.nn.functional.pad(first, (0, pad), value=num_keys)
    last_key = torch.nn.functional.pad(last, (0, pad), value=-1)

    def within_range(batch, head, query, key):
        return (key >= first_key[query]) & (key <= last_key[query])

    mask = BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=BLOCK,
                                    mask_mod=within_range, seq_lengths=(num_queries, num_keys),
                                    compute_q_blocks=False)
    return mask, (first_key, last_key)


def _block_list(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, key tiles]`` booleans -> FlexAttention's (count per row, tile indices with those first, in order),
    shaped ``[1, 1, ...]`` (one batch, shared by every head)."""
    counts = tiles.sum(1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def _mask_tensors(mask, bounds) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """The block mask's tile lists and the key bounds its mask function reads, each with its tile or token
    dimensions."""
    counts = [(t, (2,)) for t in (mask.kv_num_blocks, mask.full_kv_num_blocks)]
    indices = [(t, (2, 3)) for t in (mask.kv_indices, mask.full_kv_indices)]
    return counts + indices + [(t, (0,)) for t in bounds]


def flex_packed(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, scaling: float
) -> torch.Tensor | None:
    """Packed prefill attention ``[T, H_q, D]`` by FlexAttention, or None where it cannot run here."""
    mask, bounds = block_mask(plan, query.device)
    # (detached: no view's base for the compiled code to guard on, which differs between first and later chunks)
    inputs = [t.detach().unsqueeze(0).transpose(1, 2) for t in (query, keys, values)]
    for tensor, dims in [*((t, (2,)) for t in inputs), *_mask_tensors(mask, bounds)]:
        for dim in dims:
            if tensor.shape[dim] > 1:  # (a dimension of 1 is always specialized)
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
    out = _flex.run(query, lambda: _flex.attention()(*inputs, block_mask=mask, scale=scaling,
                                                     enable_gqa=query.shape[1] != keys.shape[1]))
    return None if out is None else out[0].transpose(0, 1).contiguous()
