"""The cache's layer kinds, on Transformers' `CacheLayerMixin`: a ring of ``window`` slots for a sliding layer, and
a buffer that keeps every token for a global (full-attention) layer.

Both store keys and values as ``[B, capacity, H_kv, D]``, flattened to rows ``b * capacity + slot`` for the
plan's index writes and gathers. A ring's capacity is its window and never changes: the token at position p
lives in slot ``p % window``. A global layer's token at position p lives in slot p; its capacity grows when a
step needs more (doubling, so copies stay linear in the tokens held), or is set up front (`reserve`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from ._plan import PlanIndices, StepPlan
from ._step import Counters


def write_tokens(
    flat_keys: torch.Tensor,
    flat_values: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    """A decode step's write: row i of ``keys``/``values`` into flat storage row ``slots[i]``, unless ``keep[i]`` is
    False. A pure tensor function, so CUDA graph decoding can hand a layer a compiled copy (fused kernels: on
    the H100 0.15 ms a step for 32 layers instead of 0.42 ms)."""
    if keep is not None:
        keys = torch.where(keep, keys, flat_keys.index_select(0, slots))
        values = torch.where(keep, values, flat_values.index_select(0, slots))
    flat_keys.index_copy_(0, slots, keys)
    flat_values.index_copy_(0, slots, values)


def _copy_runs(runs, sources, destinations) -> None:
    """``destination[d:d + n] = source[s:s + n]`` for each run ``(s, d, n)``, each source into its destination."""
    for source, destination in zip(sources, destinations):
        for start, dest, rows in runs:
            destination[dest:dest + rows].copy_(source[start:start + rows])


class KVLayer(CacheLayerMixin):
    """One decoder layer's keys and values, stored as ``slot_keys``/``slot_values`` ``[B, capacity, H_kv, D]``
    (one token per slot, so a slot's write is one contiguous row).

    ``keys``/``values`` are the same storage in Transformers' layout, ``[B, H_kv, capacity, D]`` views, in slot
    order: a ring's slot s holds the newest position p with ``p % window == s`` (so its tokens are in sequence
    order only from the oldest slot on: `RollingSlidingWindowCache.slot_positions` says which position each holds),
    a global layer's slot p holds position p. Slots not yet written hold zeros.

    ``window`` is the layer's sliding window (a ring: ``capacity == window``), or ``None`` for a global layer.
    """

    slot_keys: torch.Tensor | None = None  # [B, capacity, H_kv, D]
    slot_values: torch.Tensor | None = None
    _STORAGE = ("slot_keys", "slot_values")  # every per-slot tensor: row operations and growth apply to each

    @property
    def keys(self) -> torch.Tensor | None:
        """``[B, H_kv, capacity, D]``, a view of the storage (Transformers' layout)."""
        return None if self.slot_keys is None else self.slot_keys.transpose(1, 2)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:  # Transformers' layout in, our layout stored
        self.slot_keys = None if value is None else value.transpose(1, 2).contiguous()

    @property
    def values(self) -> torch.Tensor | None:
        """``[B, H_kv, capacity, D_v]``, a view of the storage (Transformers' layout)."""
        return None if self.slot_values is None else self.slot_values.transpose(1, 2)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self.slot_values = None if value is None else value.transpose(1, 2).contiguous()

    decode_writer = staticmethod(write_tokens)  # an instance may hold a compiled copy (_compiled.CompiledLayers)

    def __init__(self, window: int | None, counters: Counters, capacity: int) -> None:
        super().__init__()
        self.window = window
        self.is_sliding = window is not None
        self.capacity = capacity
        self._counters = counters

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.slot_keys = torch.zeros(batch, self.capacity, heads, head_dim, dtype=self.dtype, device=self.device)
        self.slot_values = torch.zeros(  # values may be narrower than keys (MiMo's v_head_dim)
            batch, self.capacity, heads, value_states.shape[-1], dtype=value_states.dtype, device=self.device
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Allocate the storage on first use, check later states fit it, and hand them back unwritten."""
        fresh = self._counters.batch_size == 0 and self._counters.columns == 0  # a new cache, or one just reset
        if not self.is_initialized or (fresh and key_states.shape[0] != self.slot_keys.shape[0]):
            self.lazy_initialization(key_states, value_states)  # (again, for a reset cache's new batch size)
        else:
            batch, _, heads, head_dim = self.slot_keys.shape
            if (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != (batch, heads, head_dim):
                raise ValueError(
                    f"This cache layer holds batch {batch} x {heads} kv heads x head_dim {head_dim}, but got key "
                    f"states of shape {tuple(key_states.shape)}. A RollingSlidingWindowCache serves one batch of one "
                    "model: create a new cache (or call cache.reset()) for another."
                )
            if key_states.dtype != self.dtype or key_states.device != self.device:
                raise ValueError(
                    f"This cache layer holds {self.dtype} on {self.device}, but got {key_states.dtype} on "
                    f"{key_states.device}. Keep the model's dtype and device fixed during a generation, or start "
                    "with a new cache."
                )
        return key_states, value_states

    def grow(self, capacity: int) -> None:
        """A global layer: hold ``capacity`` slots per sequence from now on, keeping what it holds."""
        assert self.window is None and capacity >= self.capacity, "only a global layer grows"
        if self.is_initialized and capacity > self.capacity:
            for name in self._STORAGE:
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], capacity, *old.shape[2:])
                new[:, : old.shape[1]] = old
                setattr(self, name, new)
        self.capacity = capacity

    # --- storage access, used by the attention function ------------------------------------------------------------
    def storage(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this layer keeps per slot (what a captured CUDA graph reads and writes)."""
        return tuple(getattr(self, name) for name in self._STORAGE)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as ``[B * capacity, H_kv, D]`` views (row b's slots start at ``b * capacity``)."""
        return self.slot_keys.flatten(0, 1), self.slot_values.flatten(0, 1)

    def write_decode(
        self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """Write one token per sequence (``[B, H_kv, D]``) into ``slots``; where ``keep`` (``[B, 1, 1]`` bool) is
        False the slot keeps its value, so a padded row changes nothing."""
        flat_keys, flat_values = self.flat()
        self.decode_writer(flat_keys, flat_values, keys, values, slots, keep)

    def write(self, keys: torch.Tensor, values: torch.Tensor, indices: PlanIndices) -> None:
        """Write packed new tokens ``[T, H_kv, D]`` into their slots, in place: one slot per kept token."""
        flat_keys, flat_values = self.flat()
        if indices.write_runs is not None and flat_keys.dtype == keys.dtype:  # a few stretches: slice copies
            _copy_runs(indices.write_runs, (keys, values), (flat_keys, flat_values))
            return
        flat_keys.index_copy_(0, indices.write_slot, keys.index_select(0, indices.write_source))
        flat_values.index_copy_(0, indices.write_slot, values.index_select(0, indices.write_source))

    def history_with(
        self, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, indices: PlanIndices
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed keys and values of a later chunk: per sequence, its held tokens oldest first (a ring unrotated),
        then the chunk's."""
        out = [new.new_empty(plan.num_keys, *new.shape[1:]) for new in (keys, values)]
        if indices.new_runs is not None:
            _copy_runs(indices.new_runs, (keys, values), out)
        else:
            for packed, new in zip(out, (keys, values)):
                packed.index_copy_(0, indices.new_dest, new)
        if indices.held_runs is not None and self.slot_keys.dtype == keys.dtype:
            # straight from the storage's slices where it holds what the attention reads (not an 8-bit ring's codes;
            # a copy_ would cast them silently)
            _copy_runs(indices.held_runs, self.flat(), out)
        else:
            for packed, held in zip(out, self._gathered(indices.gather_slot, keys.dtype)):
                packed.index_copy_(0, indices.gather_dest, held)
        return out[0], out[1]

    def _gathered(self, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of flat storage rows ``rows``, as the attention reads them (``dtype``: the model's,
        which a plain layer stores in)."""
        flat_keys, flat_values = self.flat()
        return flat_keys.index_select(0, rows), flat_values.index_select(0, rows)

    def attended(self, key_span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode: the first ``key_span`` slots of every row, ``[B, key_span, H_kv, D]`` views."""
        if key_span == self.slot_keys.shape[1]:
            return self.slot_keys, self.slot_values
        return self.slot_keys[:, :key_span], self.slot_values[:, :key_span]

    def memory_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self.storage())

    # --- Transformers' layer contract --------------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        columns = self._counters.columns
        if self.window is None:
            return columns + query_length, 0
        return min(columns, self.window) + query_length, max(0, columns - self.window)

    def get_seq_length(self) -> int:
        return self._counters.columns

    def get_max_length(self) -> int:
        return -1  # neither kind has a maximum length: a ring wraps, a global layer grows

    def reset(self) -> None:
        if self.is_initialized:
            for tensor in self.storage():
                tensor.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows become ``beam_idx``'s, in place (the storage, and a graph reading it, stay valid)."""
        if self.is_initialized:
            rows = beam_idx.to(self.device)
            for tensor in self.storage():
                tensor.copy_(tensor.index_select(0, rows))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            rows = indices.to(self.device)
            for name in self._STORAGE:
                setattr(self, name, getattr(self, name).index_select(0, rows))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in self._STORAGE:
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))


@dataclass(frozen=True)
class StagedKV:
    """What `RollingSlidingWindowCache.update` hands the attention function, as both its key and value argument:
    the layer's new keys and values (``[B, H_kv, q, D]``, rotary applied), not yet written to the cache."""

    cache: object  # the RollingSlidingWindowCache
    layer_idx: int
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def layer(self) -> KVLayer:
        return self.cache.layers[self.layer_idx]

    def __getattr__(self, name: str):
        """Another attention function reading these as tensors (``key.shape``, ``key.transpose``...) gets a clear
        error instead of a confusing one."""
        raise AttributeError(
            f"An attention function read .{name} of the staged keys of a RollingSlidingWindowCache: the cache works "
            "only with attn_implementation='rolling_xformers'. Call model.set_attn_implementation('rolling_xformers') "
            "after `import hf_rolling_cache`, or use Transformers' own caches with other attention implementations."
        )
