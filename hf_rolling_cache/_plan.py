"""The per-forward step plan: who is real, which slots they go to, which keys each query sees, and the mask.

One plan per layer kind and forward (a ring of ``window`` slots, or a global layer: ``window=None``), built from
host ints only by the step ledger (``_step.py``) and shared by every layer of that kind. Device copies of its index
tensors and masks are made once per device, so a model spread over several devices moves the plan to each of them
once, not once per layer.

A layer's storage is ``[B, capacity, H_kv, D]``, flattened to rows ``b * capacity + slot``: for a ring
``capacity == window``; a global layer keeps every token, in slot = position, and its capacity grows.

Worked example, the walkthrough of "KV Caching in Mistral with Transformers and xFormers" (``seqlens = [4, 1, 3]``, ``window = 3``, chunks of 2 per sequence)::

    iteration 1   phase=prefill             q_seqlens=[2, 1, 2]  kv_seqlens=[2, 1, 2]
                  BlockDiagonalCausalMask(...).make_local_attention(3); then positions 0,1 | 0 | 0,1 are
                  written to slots 0,1 | 0 | 0,1 of their own rows.
    iteration 2   phase=subsequent_prefill  q_seqlens=[2, 0, 1]  kv_seqlens=[4, 1, 3]
                  keys = unrotated ring (2 | 1 | 2 cached) ++ the chunk;
                  BlockDiagonalMask(...).make_local_attention_from_bottomright(3); then write.
    decode 1      phase=decode              q_seqlens=[1, 1, 1]  kv_seqlens=[3, 2, 3]
                  positions 4 | 1 | 3 are written to slots 1 | 1 | 0 first, then
                  BlockDiagonalCausalWithOffsetPaddedKeysMask(kv_padding=3) attends over each row's ring.

A global layer of a hybrid model takes the same steps without the window: ``BlockDiagonalCausalMask``, then
``BlockDiagonalMask.make_causal_from_bottomright()`` over its cached tokens (already in order) ++ the chunk, then
the padded-keys mask over each row's first ``max(kv_seqlens)`` slots.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import _masks
from ._ring import cached_count, contiguous_runs, index_lists


class Phase(str, enum.Enum):
    """The article's three phases; each has its own mask and its own order of cache write and attention."""

    PREFILL = "prefill"  # nothing cached yet: attend within the chunk, then write
    SUBSEQUENT_PREFILL = "subsequent_prefill"  # attend over the unrotated cache ++ the chunk, then write
    DECODE = "decode"  # one token per sequence: write, then attend over the ring


class PlanIndices(NamedTuple):
    """A plan's index tensors on one device (``None`` where the phase needs none)."""

    query_index: torch.Tensor | None  # [num_queries] rows of the [B * q_length] grid that hold real tokens
    write_source: torch.Tensor  # [num_writes] rows of the packed new tokens that go into the ring
    write_slot: torch.Tensor  # [num_writes] rows of the flat [B * capacity] storage they go to
    gather_slot: torch.Tensor | None  # subsequent prefill: storage rows of the cached tokens, oldest first
    gather_dest: torch.Tensor | None  # ... and their rows in the packed keys
    new_dest: torch.Tensor | None  # ... and the rows of this chunk's tokens in the packed keys
    # The same moves as a few contiguous stretches, (source row, destination row, rows), where there are at most
    # `_ring.MAX_RUNS` (one sequence: a ring's wrap makes two): slice copies instead of index kernels. None: more.
    write_runs: tuple[tuple[int, int, int], ...] | None = None  # write_source -> write_slot
    held_runs: tuple[tuple[int, int, int], ...] | None = None  # gather_slot -> gather_dest
    new_runs: tuple[tuple[int, int, int], ...] | None = None  # the chunk's packed rows in order -> new_dest


def _window_slots(newest: torch.Tensor, kv_seqlens: torch.Tensor, window: int | None, slots: int) -> torch.Tensor:
    """``[B, 1, 1, slots]``: True where a slot holds one of the ``kv_seqlens[b]`` newest positions (up to
    ``newest[b]``). A ring's slot s holds the latest position ``p <= newest`` with ``p % slots == s``; a global
    layer's slot s holds position s."""
    slot = torch.arange(slots, device=newest.device)
    newest = newest[:, None]
    held = slot[None, :] if window is None else newest - (newest - slot) % slots
    valid = (held >= 0) & (held <= newest) & (held > newest - kv_seqlens[:, None])
    return valid.view(-1, 1, 1, slots)


def _key_bias(plan, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """A plan's decode `key_padding` as an additive bias (0 / -inf) in the attention's dtype, made once per step and
    shared by every layer (SDPA would otherwise turn a boolean mask into one in each layer)."""
    key = ("key_bias", device, dtype)
    if key not in plan._per_device:
        padding = plan.key_padding(device)
        plan._per_device[key] = None if padding is None else torch.zeros(
            padding.shape, dtype=dtype, device=device).masked_fill_(~padding, -torch.inf)
    return plan._per_device[key]


@dataclass(frozen=True, eq=False)
class StepPlan:
    """Everything one forward needs to know about its batch, computed once and shared by all layers."""

    phase: Phase
    window: int | None  # None: a global layer, every token attended
    capacity: int  # slots per sequence in the layer's storage (the window, for a ring)
    key_span: int  # decode: slots per sequence attended over (the window, or max(kv_seqlens) for a global layer)
    q_length: int  # columns of this forward, padding included
    q_seqlens: tuple[int, ...]  # real query tokens per sequence
    kv_seqlens: tuple[int, ...]  # keys each sequence's queries attend over
    seen: tuple[int, ...]  # real tokens each sequence had cached before this forward
    _host_indices: dict[str, torch.Tensor | None] = field(repr=False)  # int64 host tensors
    _per_device: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.q_seqlens)

    @property
    def seen_after(self) -> tuple[int, ...]:
        return tuple(s + n for s, n in zip(self.seen, self.q_seqlens))

    @property
    def num_queries(self) -> int:
        return sum(self.q_seqlens)

    @property
    def num_keys(self) -> int:
        """Rows of the key tensor the attention reads: the packed keys, or for decode ``key_span`` slots a row."""
        return self.batch_size * self.key_span if self.phase is Phase.DECODE else sum(self.kv_seqlens)

    def indices(self, device: torch.device) -> PlanIndices:
        """The index tensors on ``device``, copied there once (one host-to-device transfer)."""
        key = ("indices", device)
        if key not in self._per_device:
            on_host = {name: self._host_indices[name] for name in PlanIndices._fields if not name.endswith("_runs")}
            host = torch.cat([values for values in on_host.values() if values is not None])
            flat = host.to(device, non_blocking=True)
            parts, start = {}, 0
            for name, values in on_host.items():
                parts[name] = None if values is None else flat[start : start + len(values)]
                start += 0 if values is None else len(values)
            runs = {}  # (prefill only: a decode step writes one token a sequence, by its own kernels)
            if self.phase is not Phase.DECODE:
                runs["write_runs"] = contiguous_runs(on_host["write_source"], on_host["write_slot"])
            if on_host["gather_slot"] is not None:
                runs["held_runs"] = contiguous_runs(on_host["gather_slot"], on_host["gather_dest"])
                chunk_rows = torch.arange(on_host["new_dest"].numel(), device="cpu")
                runs["new_runs"] = contiguous_runs(chunk_rows, on_host["new_dest"])
            self._per_device[key] = PlanIndices(**parts, **runs)
        return self._per_device[key]

    def mask(self, device: torch.device | str = "cpu") -> _masks.AttentionBias:
        """The xFormers mask of this step, with its seqlen tensors on ``device``."""
        device = torch.device(device)
        key = ("mask", device)
        if key not in self._per_device:
            if self.phase is Phase.PREFILL:
                bias = _masks.first_chunk_mask(self.q_seqlens, self.window, device=device)
            elif self.phase is Phase.SUBSEQUENT_PREFILL:
                bias = _masks.later_chunk_mask(self.q_seqlens, self.kv_seqlens, self.window, device=device)
            else:  # the padded-keys mask reads a prefix of each row: a ring without slack (or a global layer)
                assert self.window is None or self.capacity == self.window, "a ring with slack has no xFormers mask"
                bias = _masks.decode_mask(self.kv_seqlens, self.key_span, device=device)
            self._per_device[key] = bias
        return self._per_device[key]

    def decode_mask_over(self, slots: int, device: torch.device) -> _masks.AttentionBias:
        """Decode: the padded-keys mask over ``slots`` slots a row (a storage's row stride, which for a global layer
        may exceed ``key_span``), the first ``kv_seqlens[b]`` valid; made once per step and device."""
        if slots == self.key_span:
            return self.mask(device)
        key = ("decode_mask", slots, device)
        if key not in self._per_device:
            self._per_device[key] = _masks.decode_mask(self.kv_seqlens, slots, device=device)
        return self._per_device[key]

    def decode_slots(self, device: torch.device) -> tuple[torch.Tensor, None]:
        """Decode: the flat ring rows written this step (every sequence has a token)."""
        return self.indices(device).write_slot, None

    def kv_seqlens_on(self, device: torch.device) -> torch.Tensor:
        """Decode: ``kv_seqlens`` as a ``[B]`` int32 tensor on ``device`` (a kernel that takes key lengths: a ring
        without slack, or a global layer, holds each row's keys in its first ``kv_seqlens[b]`` slots)."""
        key = ("kv_seqlens", device)
        if key not in self._per_device:
            self._per_device[key] = torch.tensor(self.kv_seqlens, dtype=torch.int32, device=device)
        return self._per_device[key]

    def key_padding(self, device: torch.device) -> torch.Tensor | None:
        """Decode: ``[B, 1, 1, key_span]``, True for the slots that hold a position in each sequence's window (the
        decode mask's ``kv_seqlen``, read through the ring formula); ``None`` when every slot does."""
        assert self.phase is Phase.DECODE, "key_padding is the decode mask's"
        if min(self.kv_seqlens) == self.key_span:
            return None
        key = ("key_padding", device)
        if key not in self._per_device:
            newest = torch.tensor(self.seen, device=device)  # this step's token: the newest position held
            kv_seqlens = torch.tensor(self.kv_seqlens, device=device)
            self._per_device[key] = _window_slots(newest, kv_seqlens, self.window, self.key_span)
        return self._per_device[key]

    key_bias = _key_bias

    def dense_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The mask materialized as a [num_queries, num_keys] float tensor of 0 and -inf (the exact oracle)."""
        device = torch.device(device)
        key = ("dense", device)
        if key not in self._per_device:
            shape = (self.num_queries, self.num_keys)
            if self.phase is Phase.DECODE and self.window is not None and self.capacity != self.window:
                valid = self.key_padding(device).view(self.batch_size, self.key_span)  # a ring with slack
                dense = torch.block_diag(*(row[None].float() for row in valid)).log()  # 1 -> 0, 0 -> -inf
            else:
                dense = self.mask("cpu").materialize(shape, dtype=torch.float32)
            self._per_device[key] = dense.to(device)
        return self._per_device[key]


def build_plan(
    *, window: int | None, q_length: int, q_seqlens: Sequence[int], seen: Sequence[int], capacity: int | None = None
) -> StepPlan:
    """Plan one forward for the layers of one kind (``window=None``: global layers).

    ``q_seqlens[b]`` real tokens of sequence ``b`` sit in the last columns of this forward's ``q_length`` columns
    (left padding), and ``seen[b]`` of its tokens are already cached. Positions continue from ``seen``.
    ``capacity`` is the storage's slots per sequence (default: the window; a global layer's must hold every token).
    """
    capacity = window if capacity is None else capacity
    if capacity is None or (window is not None and capacity < window):
        raise ValueError(f"capacity {capacity} does not fit window {window}: a ring holds at least its window.")
    q_seqlens, seen = tuple(q_seqlens), tuple(seen)

    if not any(seen):
        phase = Phase.PREFILL
    elif q_length == 1 and all(n == 1 for n in q_seqlens):
        phase = Phase.DECODE
    else:
        phase = Phase.SUBSEQUENT_PREFILL

    if window is None and max(s + n for s, n in zip(seen, q_seqlens)) > capacity:
        raise ValueError(f"A global layer of {capacity} slots cannot hold {max(seen)} + {max(q_seqlens)} tokens.")
    if phase is Phase.PREFILL:
        kv_seqlens = q_seqlens
    elif phase is Phase.DECODE:
        kv_seqlens = tuple(cached_count(s + 1, window) for s in seen)
    else:
        kv_seqlens = tuple(cached_count(s, window) + n for s, n in zip(seen, q_seqlens))
    host_indices = index_lists(window=window, capacity=capacity, q_length=q_length, q_seqlens=q_seqlens, seen=seen,
                               decode=phase is Phase.DECODE, later_chunk=phase is Phase.SUBSEQUENT_PREFILL)
    return StepPlan(
        phase=phase,
        window=window,
        capacity=capacity,
        key_span=capacity if window is not None else max(kv_seqlens, default=0),
        q_length=q_length,
        q_seqlens=q_seqlens,
        kv_seqlens=tuple(kv_seqlens),
        seen=seen,
        _host_indices=host_indices,
    )


def query_layout(padding_mask: torch.Tensor | None, batch_size: int, q_length: int) -> tuple[list[int], list[int] | None]:
    """Real query tokens per sequence, and real tokens before this forward according to the mask.

    ``padding_mask`` is Transformers' 2D mask, ``[B, past + q_length]`` or ``[B, q_length]``, True for real tokens.
    Within this forward's columns each row must be left padded (``0..0 1..1``); anything else is right padding
    or a hole, which would put a pad where a real token's logits are read. One host transfer per forward.
    """
    if padding_mask is None:
        return [q_length] * batch_size, None
    if padding_mask.ndim != 2 or padding_mask.shape[0] != batch_size or padding_mask.shape[1] < q_length:
        raise ValueError(
            f"rolling_xformers needs a 2D attention_mask of shape [batch, past + {q_length}] "
            f"(1 for real tokens, 0 for padding); got shape {tuple(padding_mask.shape)}."
        )
    columns = padding_mask[:, -q_length:].to(torch.int64)
    left_padded = (columns[:, 1:] >= columns[:, :-1]).all(dim=1).to(torch.int64)
    history = padding_mask[:, :-q_length].to(torch.int64).sum(dim=1)
    q_seqlens, left_padded, history = torch.stack((columns.sum(dim=1), left_padded, history)).tolist()
    bad = [b for b, ok in enumerate(left_padded) if not ok]
    if bad:
        right = [b for b in bad if columns[b, -1] == 0]
        holes = [b for b in bad if columns[b, -1] != 0]
        problems = []
        if right:
            problems.append(f"sequences {right} are right padded (they end with padding)")
        if holes:
            problems.append(f"sequences {holes} have padding between real tokens (a hole in the attention_mask)")
        raise ValueError(
            f"In this forward's attention_mask, {' and '.join(problems)}. The rolling cache needs each row's padding "
            "on the left, before its first real token: set tokenizer.padding_side = 'left', and mark every token "
            "after the first real one as real."
        )
    if padding_mask.shape[1] == q_length:
        return q_seqlens, None
    return q_seqlens, history


@dataclass(eq=False)
class DeviceDecodePlan:
    """A decode step planned on the device, for CUDA graphs: the same step as a `StepPlan` decode (write each
    sequence's token at slot ``seen % window``, or ``seen`` for a global layer, then attend over its filled slots),
    but computed from the cache's device counters, with no host sync and static shapes. A row whose column is
    padding (``real == 0``) writes nothing and does not advance."""

    window: int | None
    capacity: int  # slots per sequence; a global layer attends over all of them (the unfilled ones masked)
    seen: torch.Tensor  # [B] int64: real tokens per sequence before this step (the cache's own buffer)
    real: torch.Tensor  # [B] int64: 1 where the sequence has a token in this step
    full: bool = False  # a ring (no slack) known on the host to hold a whole window in every row: no key mask
    mirrors: dict = field(default_factory=dict, repr=False)  # {device: (seen, real)}, shared by the step's plans
    phase = Phase.DECODE
    q_length = 1
    _per_device: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.seen.numel()

    @property
    def key_span(self) -> int:
        return self.capacity

    def counters_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``seen`` and ``real`` on ``device``: the step's own, a copy its ledger staged there (a graph segment
        on another device reads that copy), or a copy made now (eager decoding of a model split over devices)."""
        if device == self.seen.device:
            return self.seen, self.real
        if device not in self.mirrors:
            self.mirrors[device] = (self.seen.to(device), self.real.to(device))
        return self.mirrors[device]

    def decode_slots(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat storage rows written this step, and ``[B, 1, 1]`` booleans: True where the row has a token."""
        key = ("slots", device)
        if key not in self._per_device:
            seen, real = self.counters_on(device)
            rows = torch.arange(self.batch_size, device=device) * self.capacity
            slots = seen if self.window is None else seen % self.capacity
            self._per_device[key] = (rows + slots, real.view(-1, 1, 1).bool())
        return self._per_device[key]

    def kv_seqlens_on(self, device: torch.device) -> torch.Tensor:
        """``[B]`` int32: how many slots each row attends over after this step's write, counted from slot 0 (a ring
        without slack, or a global layer, fills its slots in order), for a kernel that takes key lengths instead of
        a mask (xFormers' split-K over an 8-bit ring). A row with no token yet counts one (its zero slot 0)."""
        key = ("kv_seqlens", device)
        if key not in self._per_device:
            seen, real = self.counters_on(device)
            held = (seen + real).clamp(min=1)
            if self.window is not None:
                held = held.clamp(max=self.window)
            self._per_device[key] = held.to(torch.int32)
        return self._per_device[key]

    def decode_mask_over(self, slots: int, device: torch.device) -> _masks.AttentionBias:
        """The padded-keys mask over ``slots`` slots a row, its key lengths this step's device tensor
        (`kv_seqlens_on`), for xFormers' split-K kernel only (`_masks.decode_mask_of`)."""
        return _masks.decode_mask_of(self.kv_seqlens_on(device), slots)

    def key_padding(self, device: torch.device) -> torch.Tensor | None:
        """``[B, 1, 1, capacity]``: True for the slots each row attends over; ``None`` when every slot of every row
        holds a position of its window (`full`), which spares the attention a mask."""
        if self.full:
            return None
        key = ("key_padding", device)
        if key not in self._per_device:
            # a row with no token yet attends to its (zero) slot 0: a finite output, discarded as padding
            seen, real = self.counters_on(device)
            newest = (seen + real - 1).clamp(min=0)
            kv_seqlens = newest + 1 if self.window is None else (newest + 1).clamp(max=self.window)
            self._per_device[key] = _window_slots(newest, kv_seqlens, self.window, self.capacity)
        return self._per_device[key]

    key_bias = _key_bias
