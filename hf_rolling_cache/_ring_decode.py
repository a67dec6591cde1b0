"""Decode attention over a ring with the step's write folded in: two Triton kernels instead of a write and SDPA.

A decode step writes each sequence's new key and value into its slot, then attends one query per sequence over the
row's filled slots. SDPA reads the ring well at large batches, but one sequence gives it only 32 query heads of work:
at B=1 it reaches under half of the bandwidth floor, and the write costs kernels of its own. Here, as in
flash-decoding, a row's slots are split into chunks so a single sequence fills the GPU:

1. ``_write_and_attend_chunks``: one program per (chunk, kv head, sequence) reads the chunk's keys and values once
   for all of that kv head's query heads (grouped query attention without repeating K/V), and keeps a running
   softmax (its max, its sum, its weighted values). The program whose chunk holds this step's slot takes the new
   key and value from its registers, not the ring, and writes them there after its reads (no other program reads
   that slot).
2. ``_combine_chunks``: one program per (query head, sequence) merges the chunks' partial softmaxes.

They serve batches whose rows' kv heads do not fill the GPU alone (`splits_rows`); a larger batch keeps the write
and SDPA, which then read the ring as fast. On an H100, Mistral-7B shape at B=1 (``benchmarks.decode_attention``):
12.4 us a layer, write included, where the write and SDPA take about 3.7 + 13.0 us.

A row attends over its first ``kv_seqlens[b]`` slots: a ring without slack fills its slots in order, so whatever it
holds is a prefix (and once full, every slot), and so does a global layer. ``kv_seqlens`` is a device tensor, so
the same kernels serve an eager step and a step captured in a CUDA graph.

On Hopper GPUs both kernels are programmatic dependent launches (`dependent_launch`): each may start while the
kernel before it finishes and waits for it before reading anything, then lets the next such kernel start.

Scores are float32 (the products accumulate in float32; float32 inputs multiply in IEEE float32, not TF32), the
probabilities are cast to the values' dtype before the second product, as flash attention does.

The kernels are compiled by Triton for CUDA tensors. CPU tests run the very same kernels through Triton's
interpreter (``TRITON_INTERPRET=1`` before Triton is imported, as ``tests/conftest.py`` sets without a GPU);
without Triton this module offers nothing (`kernel_available` is False) and decoding keeps SDPA.
"""

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: SDPA decodes
    triton = tl = None

# How the kernels are launched (chosen on an H100 by `benchmarks.decode_attention`'s grid, 7B shape, B=1/8/32): a
# row's slots are split until the grid holds about ``programs_per_sm`` programs per multiprocessor, in chunks of at
# least ``min_chunk`` slots and at most ``max_splits`` of them, and not at all once the rows' kv heads alone fill
# the GPU; ``block``: slots per inner step (None: `block_slots`); Triton's warps and pipeline stages.
_CONFIG = {"programs_per_sm": 4, "min_chunk": 256, "max_splits": 64, "block": None, "num_warps": 8, "num_stages": 3,
           "dependent_launch": True}


if tl is not None:

    @triton.jit
    def _write_and_attend_chunks(
        Q, NEW_K, NEW_V, K, V, ROWS, KEEP, KV_LEN, M, L, ACC, OUT,
        scale, capacity, head_dim, value_dim, chunk,
        stride_qb, stride_qh, stride_nkb, stride_nkh, stride_nvb, stride_nvh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_ob, stride_oh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, HAS_KEEP: tl.constexpr, SINGLE: tl.constexpr, IEEE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:  # launched before the kernel writing Q, NEW_K, NEW_V finished: wait for it, then let the next start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        split = tl.program_id(0)
        head = tl.program_id(1)  # the kv head
        row = tl.program_id(2).to(tl.int64)  # row offsets pass 2**31 elements in large caches
        splits = tl.num_programs(0)
        kv_heads = tl.num_programs(1)

        kv_len = tl.load(KV_LEN + row)
        slot = tl.load(ROWS + row) - row * capacity  # this step's slot in the row
        target = slot  # the slot this row's token goes to, or -1 where the row writes nothing
        if HAS_KEEP:
            target = tl.where(tl.load(KEEP + row) != 0, slot, -1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        n = tl.arange(0, BLOCK_N)
        query_heads = head * GROUP + g
        q = tl.load(Q + row * stride_qb + query_heads[:, None] * stride_qh + d[None, :],
                    mask=(g[:, None] < GROUP) & (d[None, :] < head_dim), other=0.0)
        new_k = tl.load(NEW_K + row * stride_nkb + head * stride_nkh + d, mask=d < head_dim, other=0.0)
        new_v = tl.load(NEW_V + row * stride_nvb + head * stride_nvh + dv, mask=dv < value_dim, other=0.0)

        start = split * chunk
        end = tl.minimum(start + chunk, kv_len)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for first in range(start, end, BLOCK_N):
            slots = first + n
            valid = slots < end
            fresh = (slots == target)[:, None]  # this step's token: from registers, not the ring
            k = tl.load(K + row * stride_kb + slots[:, None] * stride_ks + head * stride_kh + d[None, :],
                        mask=valid[:, None] & (d[None, :] < head_dim), other=0.0)
            v = tl.load(V + row * stride_vb + slots[:, None] * stride_vs + head * stride_vh + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < value_dim), other=0.0)  # both reads in flight at once
            k = tl.where(fresh, new_k[None, :], k)
            v = tl.where(fresh, new_v[None, :], v)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        # the write, after the reads (which took this slot from registers): only the program whose chunk holds the
        # slot writes it (one per kv head and row)
        writes = (target >= start) & (target < start + chunk)
        tl.store(K + row * stride_kb + slot * stride_ks + head * stride_kh + d, new_k,
                 mask=d < tl.where(writes, head_dim, 0))
        tl.store(V + row * stride_vb + slot * stride_vs + head * stride_vh + dv, new_v,
                 mask=dv < tl.where(writes, value_dim, 0))

        heads_real = g < GROUP
        if SINGLE:  # one chunk a row: it is the answer
            out = acc / l_i[:, None]
            tl.store(OUT + row * stride_ob + query_heads[:, None] * stride_oh + dv[None, :],
                     out.to(OUT.dtype.element_ty), mask=heads_real[:, None] & (dv[None, :] < value_dim))
        else:  # partials [B, H_q, splits] (and [.., BLOCK_DV]), float32
            at = (row * kv_heads * GROUP + query_heads) * splits + split
            tl.store(M + at, m_i, mask=heads_real)
            tl.store(L + at, l_i, mask=heads_real)
            tl.store(ACC + at[:, None] * BLOCK_DV + dv[None, :], acc, mask=heads_real[:, None])

    @triton.jit
    def _combine_chunks(
        M, L, ACC, OUT, splits, value_dim, stride_ob, stride_oh,
        BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        query_head = tl.program_id(0)
        row = tl.program_id(1)
        query_heads = tl.num_programs(0)
        s = tl.arange(0, BLOCK_S)
        dv = tl.arange(0, BLOCK_DV)
        at = (row * query_heads + query_head) * splits + s
        real = s < splits
        m = tl.load(M + at, mask=real, other=float("-inf"))
        l = tl.load(L + at, mask=real, other=0.0)
        acc = tl.load(ACC + at[:, None] * BLOCK_DV + dv[None, :], mask=real[:, None], other=0.0)
        newest = tl.max(m, 0)  # chunk 0 always holds a key: finite
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - newest))  # an empty chunk weighs nothing
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
        tl.store(OUT + row * stride_ob + query_head * stride_oh + dv, out.to(OUT.dtype.element_ty),
                 mask=dv < value_dim)


def kernel_available() -> bool:
    """Whether Triton is installed (the kernels compile for CUDA tensors)."""
    return triton is not None


def compile_errors() -> tuple[type[Exception], ...]:
    """What Triton raises when it cannot build a kernel for this GPU (its compiler, ptxas, or too little shared
    memory), as opposed to a fault in a launched kernel."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    return (CompilationError, errors.OutOfResources) + tuple(
        error for error in (getattr(errors, "PTXASError", None),) if error is not None
    )


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors; on CPU (Triton's interpreter, in tests) a pretend 16, so small rings split."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16


def splits_rows(batch: int, kv_heads: int, device: torch.device) -> bool:
    """Whether the kernels would split rows (fewer rows' kv heads than multiprocessors): where they do not, a
    whole batch already fills the GPU, and SDPA after a separate write read the ring at least as fast on the
    H100 (B=32, 7B shape: 177.8 us a layer against 180.7, plus about 3.7 us of write)."""
    return batch * kv_heads < _multiprocessors(device)


def _dependent_launch(tensor: torch.Tensor) -> dict:
    """Launch options for programmatic dependent launch on CUDA (`dependent_launch`): the kernel may start while
    the one before it finishes, and waits for it before reading anything (``gdc_wait``); it then lets the next
    such kernel start. Off elsewhere (Triton's interpreter)."""
    return {"PDL": True, "launch_pdl": True} if tensor.is_cuda and dependent_launch(tensor.device) else {"PDL": False}


def dependent_launch(device: torch.device) -> bool:
    """Whether our kernels use programmatic dependent launch on ``device``: NVIDIA Hopper and later (compute
    capability 9+; not ROCm, whose GPUs report 9.x too), where CUDA graphs keep the launches' edges; the benchmarks
    switch it off to measure its worth."""
    return _CONFIG["dependent_launch"] and torch.version.hip is None and _capability(device) >= 9


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def block_slots(head_dim: int) -> int:
    """Slots per inner step of a program: 64 up to heads of 128, 32 beyond (the tiles stay in registers)."""
    return 64 if head_dim <= 128 else 32


def split_count(batch: int, kv_heads: int, key_span: int, block: int, device: torch.device) -> tuple[int, int]:
    """How many chunks a row's ``key_span`` slots are split into, and each chunk's slots (a multiple of ``block``):
    enough programs to fill the GPU (none when ``batch * kv_heads`` programs already do), no chunk shorter than
    ``min_chunk`` slots or one block, at most ``max_splits`` chunks (the merging kernel holds them all in
    registers)."""
    blocks = max(1, math.ceil(key_span / block))
    wanted = 1
    if splits_rows(batch, kv_heads, device):
        wanted = math.ceil(_CONFIG["programs_per_sm"] * _multiprocessors(device) / (batch * kv_heads))
    splits = max(1, min(wanted, blocks, key_span // _CONFIG["min_chunk"], _CONFIG["max_splits"]))
    chunk = math.ceil(blocks / splits) * block
    return math.ceil(key_span / chunk), chunk


def ring_attention(
    query: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    slot_keys: torch.Tensor,
    slot_values: torch.Tensor,
    rows: torch.Tensor,
    keep: torch.Tensor | None,
    kv_seqlens: torch.Tensor,
    key_span: int,
    scaling: float,
) -> torch.Tensor:
    """Write this step's tokens and attend: ``query [B, H_q, 1, D]``, ``new_keys``/``new_values`` ``[B, H_kv, D]``
    (written where ``keep [B, 1, 1]`` is True, or everywhere when it is None) into flat storage rows ``rows [B]``
    (``b * capacity + slot``) of ``slot_keys``/``slot_values`` ``[B, capacity, H_kv, D]``, in place; then row b
    attends over its first ``kv_seqlens[b]`` slots (``[B]`` int32, at most ``key_span``, which sets the split).
    Returns ``[B, 1, H_q, D_v]``."""
    batch, query_heads, _, head_dim = query.shape
    capacity, kv_heads, value_dim = slot_keys.shape[1], slot_keys.shape[2], slot_values.shape[-1]
    assert slot_keys.stride(-1) == slot_values.stride(-1) == 1, "the kernels read a slot's head as one row"
    group = query_heads // kv_heads
    block = _CONFIG["block"] or block_slots(max(head_dim, value_dim))
    splits, chunk = split_count(batch, kv_heads, key_span, block, query.device)
    out = query.new_empty(batch, 1, query_heads, value_dim)
    block_dv = max(16, triton.next_power_of_2(value_dim))
    if splits > 1:
        partial_max = torch.empty(batch, query_heads, splits, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
        partial_out = torch.empty(batch, query_heads, splits, block_dv, dtype=torch.float32, device=query.device)
    else:
        partial_max = partial_sum = partial_out = out  # unused
    q = query.view(batch, query_heads, head_dim) if query.is_contiguous() else query[:, :, 0]
    q, new_keys, new_values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, new_keys, new_values))
    keep_flags = rows if keep is None else keep.view(-1).view(torch.uint8)
    _write_and_attend_chunks[(splits, kv_heads, batch)](
        q, new_keys, new_values, slot_keys, slot_values, rows, keep_flags, kv_seqlens,
        partial_max, partial_sum, partial_out, out,
        scaling, capacity, head_dim, value_dim, chunk,
        q.stride(0), q.stride(1), new_keys.stride(0), new_keys.stride(1), new_values.stride(0), new_values.stride(1),
        slot_keys.stride(0), slot_keys.stride(1), slot_keys.stride(2),
        slot_values.stride(0), slot_values.stride(1), slot_values.stride(2),
        out.stride(0), out.stride(2),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=block_dv,
        HAS_KEEP=keep is not None, SINGLE=splits == 1, IEEE=query.dtype == torch.float32,
        num_warps=_CONFIG["num_warps"], num_stages=_CONFIG["num_stages"], **_dependent_launch(query),
    )
    if splits > 1:
        _combine_chunks[(query_heads, batch)](
            partial_max, partial_sum, partial_out, out, splits, value_dim, out.stride(0), out.stride(2),
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DV=block_dv, **_dependent_launch(query),
        )
    return out
