"""`RollingSlidingWindowCache`: exactly ``window`` slots per layer and sequence, written in place.

The cache owns the rings and the per-sequence counters. It does not decide who is real or which mask to use:
the step plan does (``_plan.py``), and the attention function writes the ring with it (``attention.py``).
`update` therefore only checks and stages a layer's new keys and values for that attention function.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from ._plan import DeviceDecodePlan, PlanIndices, StepPlan
from ._ring import slot_positions
from ._support import layer_windows

ATTENTION_NAME = "rolling_xformers"


class _Progress:
    """Counters shared by a cache and its layers: real tokens per sequence, and columns (padding included).

    A decode step planned on the device (`DeviceDecodePlan`, the one a CUDA graph replays) advances ``device_seen``
    in place, without a host sync; the host list catches up lazily, the first time it is read.
    """

    def __init__(self) -> None:
        self._seen: list[int] = []  # empty until the first forward fixes the batch size
        self.columns = 0
        self.device_seen: torch.Tensor | None = None  # [B] int64; ahead of the host list while `_host_stale`
        self._host_stale = False

    @property
    def seen(self) -> list[int]:
        if self._host_stale:
            self._seen = self.device_seen.tolist()
            self._host_stale = False
        return self._seen

    @seen.setter
    def seen(self, values: list[int]) -> None:
        self._seen = list(values)
        self._host_stale = False
        if self.device_seen is not None:
            if self.device_seen.numel() == len(self._seen):  # in place: a captured graph reads this very buffer
                self.device_seen.copy_(torch.tensor(self._seen, dtype=torch.long))
            else:
                self.device_seen = None

    @property
    def batch_size(self) -> int:
        """Sequences held (0 before the first forward); known on the host even while the counters are not."""
        return len(self._seen)

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The counters as a device tensor, made once and then kept in step with the host list."""
        if self.device_seen is None or self.device_seen.device != device:
            self.device_seen = torch.tensor(self.seen, dtype=torch.long, device=device)
        return self.device_seen

    def advanced_on_device(self) -> None:
        self._host_stale = True


def write_tokens(
    ring_keys: torch.Tensor,
    ring_values: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    """A decode step's ring write: row i of ``keys``/``values`` into flat ring row ``slots[i]``, unless ``keep[i]``
    is False. A pure tensor function, so CUDA graph decoding can hand a layer a compiled copy (fused kernels: on
    the H100 0.15 ms a step for 32 layers instead of 0.42 ms)."""
    if keep is not None:
        keys = torch.where(keep, keys, ring_keys.index_select(0, slots))
        values = torch.where(keep, values, ring_values.index_select(0, slots))
    ring_keys.index_copy_(0, slots, keys)
    ring_values.index_copy_(0, slots, values)


class RollingLayer(CacheLayerMixin):
    """One decoder layer's ring: keys and values ``[B, window, H_kv, D]``; row b's slot s holds its newest token
    whose position p has ``p % window == s``."""

    is_sliding = True
    decode_writer = staticmethod(write_tokens)  # an instance may hold a compiled copy (graphs._CompiledLayers)

    def __init__(self, window: int, progress: _Progress) -> None:
        super().__init__()
        self.window = window
        self._progress = progress

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(batch, self.window, heads, head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(batch, self.window, heads, head_dim, dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Allocate the ring on first use, check later states fit it, and hand them back unwritten."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            batch, window, heads, head_dim = self.keys.shape
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

    # --- ring access, used by the attention function -------------------------------------------------------------
    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rings as ``[B * window, H_kv, D]`` views (row b's slots are rows ``b*window .. b*window + window-1``)."""
        _, _, heads, head_dim = self.keys.shape
        return self.keys.view(-1, heads, head_dim), self.values.view(-1, heads, head_dim)

    def write_decode(
        self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """Write one token per sequence (``[B, H_kv, D]``) into ``slots``; where ``keep`` (``[B, 1, 1]`` bool) is
        False the slot keeps its value, so a padded row changes nothing."""
        ring_keys, ring_values = self.flat()
        self.decode_writer(ring_keys, ring_values, keys, values, slots, keep)

    def write(self, keys: torch.Tensor, values: torch.Tensor, indices: PlanIndices) -> None:
        """Write packed new tokens ``[T, H_kv, D]`` into their slots, in place: one slot per kept token."""
        ring_keys, ring_values = self.flat()
        ring_keys.index_copy_(0, indices.write_slot, keys.index_select(0, indices.write_source))
        ring_values.index_copy_(0, indices.write_slot, values.index_select(0, indices.write_source))

    def unrotated_with(
        self, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, indices: PlanIndices
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed keys and values of a later chunk: per sequence, its cached tokens oldest first, then the chunk."""
        ring_keys, ring_values = self.flat()
        out = []
        for ring, new in ((ring_keys, keys), (ring_values, values)):
            packed = new.new_empty(plan.num_keys, *new.shape[1:])
            packed.index_copy_(0, indices.gather_dest, ring.index_select(0, indices.gather_slot))
            packed.index_copy_(0, indices.new_dest, new)
            out.append(packed)
        return out[0], out[1]

    # --- Transformers' layer contract --------------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        columns = self._progress.columns
        return min(columns, self.window) + query_length, max(0, columns - self.window)

    def get_seq_length(self) -> int:
        return self._progress.columns

    def get_max_length(self) -> int:
        return -1  # a ring has no maximum length

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            rows = rows.to(self.device)
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows become ``beam_idx``'s, in place (the storage, and a graph reading it, stay valid)."""
        if self.is_initialized:
            rows = beam_idx.to(self.device)
            self.keys.copy_(self.keys.index_select(0, rows))
            self.values.copy_(self.values.index_select(0, rows))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


@dataclass(frozen=True)
class StagedKV:
    """What `RollingSlidingWindowCache.update` hands the attention function, as both its key and value argument:
    the layer's new keys and values (``[B, H_kv, q, D]``, rotary applied), not yet written to the ring."""

    cache: RollingSlidingWindowCache
    layer_idx: int
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def layer(self) -> RollingLayer:
        return self.cache.layers[self.layer_idx]


class _OpenStep:
    """A forward in progress: its plan and how many layers have written their ring."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan
        self.written: set[int] = set()


class RollingSlidingWindowCache(Cache):
    """A rolling-buffer KV cache for sliding-window models (Mistral): per layer and sequence exactly ``window``
    slots, the token at position p in slot ``p % window``, written in place, never grown, never rolled.

    Use it with ``attn_implementation="rolling_xformers"``::

        cache = RollingSlidingWindowCache(config=model.config)
        model.generate(**batch, past_key_values=cache, prefill_chunk_size=model.config.sliding_window)

    Args:
        config: the model's config; ``sliding_window`` and ``num_hidden_layers`` are read from it.
        window: the window, if the config has none; it must agree with the config's when both are given.
        num_layers: the number of decoder layers, if no config is given.
    """

    def __init__(
        self, config: PreTrainedConfig | None = None, *, window: int | None = None, num_layers: int | None = None
    ) -> None:
        config_window = getattr(config, "sliding_window", None) if config is not None else None
        if config is not None:
            windows = layer_windows(config, window if config_window is None else None)
            if any(w is None for w in windows):
                raise ValueError(
                    "This model mixes sliding and full-attention layers (layer_types); the rolling cache does not "
                    "handle full-attention layers yet. Use Transformers' own cache for this model."
                )
            if window is not None and config_window is not None and window != config_window:
                raise ValueError(
                    f"window={window} disagrees with the model's sliding_window={config_window}. The cache must hold "
                    "the window the model attends over: drop window=, or set model.config.sliding_window first."
                )
            window = windows[0]
            num_layers = len(windows) if num_layers is None else num_layers
        if window is None:
            raise ValueError(
                "RollingSlidingWindowCache needs a sliding window: pass the model's config, or window=W."
            )
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise ValueError(f"window must be a positive int, got {window!r}.")
        if num_layers is None:
            raise ValueError("Pass the model's config (or num_layers=) so the cache knows how many layers it has.")
        self.window = window
        self.config = config
        self._progress = _Progress()
        self._open: _OpenStep | None = None
        self.last_plan: StepPlan | DeviceDecodePlan | None = None
        self.decode_on_device = False  # plan decode steps on the device (set by CUDA graph decoding)
        self._step_real: torch.Tensor | None = None  # [B] this decode step's real flags, a static buffer
        self._decode_graph = None  # graphs._DecodeGraph, captured by CUDA graph decoding
        self.decode_graph_warmup_s: float | None = None  # seconds the last decode graph took to warm up and capture
        self._warned_positions = False
        super().__init__(layers=[RollingLayer(window, self._progress) for _ in range(num_layers)])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(window={self.window}, layers={len(self.layers)}, "
            f"batch={len(self._progress.seen) or None}, seen={self._progress.seen})"
        )

    # --- what the model calls --------------------------------------------------------------------------------------
    @torch.compiler.disable  # a graph break under torch.compile: host-side checks and bookkeeping, no kernels
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Check and stage a layer's new keys and values; the "rolling_xformers" attention writes and reads them.

        Returns the same `StagedKV` twice (as the key and the value argument of the attention function).
        """
        implementation = getattr(self.config, "_attn_implementation", ATTENTION_NAME)
        if implementation != ATTENTION_NAME:
            raise ValueError(
                f"RollingSlidingWindowCache works only with attn_implementation='{ATTENTION_NAME}', but the model "
                f"uses '{implementation}'. Call model.set_attn_implementation('{ATTENTION_NAME}') after "
                "`import hf_rolling_cache`, or use Transformers' own caches with other attention implementations."
            )
        self._check_usable(layer_idx)
        batch = self._progress.batch_size
        if batch and key_states.shape[0] != batch:
            raise ValueError(
                f"This cache holds a batch of {batch} sequences but the model was called with a batch of "
                f"{key_states.shape[0]}. A RollingSlidingWindowCache serves one batch: create a new cache "
                "(or call cache.reset()) for another batch."
            )
        self.layers[layer_idx].update(key_states, value_states)
        staged = StagedKV(self, layer_idx, key_states, value_states)
        return staged, staged

    # --- the per-forward protocol with the attention function ---------------------------------------------------
    def seen_for(self, batch_size: int) -> tuple[int, ...]:
        """Real tokens cached per sequence, zeros for a fresh cache."""
        return tuple(self._progress.seen) if self._progress.seen else (0,) * batch_size

    def begin_step(self, plan: StepPlan, history: list[int] | None, mask_columns: int | None) -> None:
        """Open a forward. ``history`` is what the attention_mask says each sequence had before it."""
        self._check_usable()
        seen = self._progress.seen
        if mask_columns is not None and mask_columns != self._progress.columns + plan.q_length:
            raise ValueError(
                f"The attention_mask has {mask_columns} columns, but this cache has processed "
                f"{self._progress.columns} and this forward brings {plan.q_length}. Pass the mask of the whole "
                "conversation so far (as generate does), or a new cache for a new batch."
            )
        if seen and mask_columns is None and any(s != self._progress.columns for s in seen):
            raise ValueError(
                f"This forward has no attention_mask, which says no sequence has padding, but this cache holds padded "
                f"sequences ({list(seen)} real tokens in {self._progress.columns} columns). It belongs to another "
                "batch: pass a new RollingSlidingWindowCache (or call cache.reset()), or pass the attention_mask."
            )
        if seen and history is not None:
            if list(history) != list(seen):
                raise ValueError(
                    f"The attention_mask says the sequences had {list(history)} real tokens before this forward, but "
                    f"this cache holds {list(seen)}. The cache belongs to another batch or conversation: pass a new "
                    "RollingSlidingWindowCache (or call cache.reset())."
                )
        self._open = _OpenStep(plan)

    def device_decode_plan(self, padding_mask: torch.Tensor | None, device: torch.device) -> DeviceDecodePlan:
        """Open a decode step planned on the device: no host sync, static shapes (what a CUDA graph captures).

        ``padding_mask`` is the whole 2D mask (``[B, columns + 1]``) or this step's column alone (``[B, 1]``).
        """
        self._check_usable()
        batch = self._progress.batch_size
        if padding_mask is not None and padding_mask.shape[1] not in (1, self._progress.columns + 1):
            raise ValueError(
                f"The attention_mask has {padding_mask.shape[1]} columns, but this cache has processed "
                f"{self._progress.columns} and a decode step brings 1. Pass the mask of the whole conversation so "
                "far (as generate does), or a new cache for a new batch."
            )
        if padding_mask is not None and padding_mask.shape[0] != batch:
            raise ValueError(f"This cache holds a batch of {batch} sequences, not {padding_mask.shape[0]}.")
        if self._step_real is None or self._step_real.device != device or self._step_real.numel() != batch:
            self._step_real = torch.ones(batch, dtype=torch.long, device=device)
        if padding_mask is None:
            self._step_real.fill_(1)
        else:
            self._step_real.copy_(padding_mask[:, -1])
        plan = DeviceDecodePlan(window=self.window, seen=self._progress.on_device(device), real=self._step_real)
        self._open = _OpenStep(plan)
        return plan

    def warn_positions_once(self, position: int, max_positions: int) -> None:
        """Rotary positions past what the model was trained for: the ring keeps going, the model may not."""
        if not self._warned_positions:
            self._warned_positions = True
            warnings.warn(
                f"Sequences have reached position {position}, past the model's max_position_embeddings "
                f"({max_positions}). The rolling cache keeps working, but the model was not trained on such "
                "positions and its output may degrade.",
                stacklevel=2,
            )

    def layer_written(self, plan: StepPlan, layer_idx: int) -> None:
        """Count a layer's ring as written; once every layer has written, the forward is committed."""
        step = self._open
        assert step is not None and step.plan is plan, "layer_written outside the forward that planned it"
        step.written.add(layer_idx)
        if len(step.written) == len(self.layers):
            if isinstance(plan, DeviceDecodePlan):
                plan.seen.add_(plan.real)  # on the device, no sync (captured into a CUDA graph too)
                self._progress.advanced_on_device()
            else:
                self._progress.seen = list(plan.seen_after)
            self._progress.columns += plan.q_length
            self._open = None
            self.last_plan = plan

    def _check_usable(self, layer_idx: int | None = None) -> None:
        """Raise if an earlier forward was interrupted after writing some layers (their rings now disagree).

        ``layer_idx`` is the layer about to run: in the forward that is open it has not written yet, so an open
        step is only stale when it already holds this layer (or, with no layer given, when any layer wrote).
        """
        step = self._open
        if step is None or (layer_idx is not None and layer_idx not in step.written):
            return
        if not step.written:
            self._open = None  # the interrupted forward wrote nothing: the cache is exactly as before it
            return
        raise RuntimeError(
            f"A previous forward stopped after writing {len(step.written)} of {len(self.layers)} layers "
            "(an exception or an interrupt), so the layers no longer hold the same tokens. This cache cannot be "
            "used further: call cache.reset() or create a new RollingSlidingWindowCache."
        )

    # --- inspection ------------------------------------------------------------------------------------------------
    @property
    def seen(self) -> list[int]:
        """Real tokens processed per sequence (its next position), empty before the first forward."""
        return list(self._progress.seen)

    def slot_positions(self) -> list[list[int]]:
        """Per sequence, the position each ring slot holds (``-1`` if empty)."""
        return [slot_positions(s, self.window) for s in self._progress.seen]

    def memory_bytes(self) -> int:
        """Bytes held by the rings of all layers."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in self.layers
            if layer.is_initialized
        )

    # --- Transformers' cache contract ------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns processed so far, padding included (what generate slices its inputs with)."""
        return self._progress.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[0].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reset(self) -> None:
        """Forget everything; the rings stay allocated and are reused."""
        super().reset()
        self._progress.seen = []
        self._progress.columns = 0
        self._open = None
        self.last_plan = None
        self._decode_graph = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder sequences (beam search): row i becomes old row ``beam_idx[i]``."""
        self._check_usable()
        rows = beam_idx.tolist()
        super().reorder_cache(beam_idx)
        if self._progress.seen:
            self._progress.seen = [self._progress.seen[r] for r in rows]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._check_usable()
        rows = indices.tolist()
        super().batch_select_indices(indices)
        if self._progress.seen:
            self._progress.seen = [self._progress.seen[r] for r in rows]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._check_usable()
        super().batch_repeat_interleave(repeats)
        self._progress.seen = [s for s in self._progress.seen for _ in range(repeats)]

    @property
    def is_croppable(self) -> bool:
        return all(s <= self.window for s in self._progress.seen)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest ``-tokens_to_remove`` tokens (Transformers' convention: a negative count).

        Exact only while no sequence has wrapped its ring (at most ``window`` tokens each): after that, the tokens
        a rollback would bring back into the window have been overwritten, and this raises instead.
        """
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove, as Transformers' caches do.")
        count = -tokens_to_remove
        if count == 0:
            return
        self._check_usable()
        seen = self._progress.seen
        if count > self._progress.columns or any(s < count for s in seen):
            raise ValueError(f"Cannot remove {count} tokens: the sequences hold only {seen}.")
        if not self.is_croppable:
            raise ValueError(
                f"Cannot roll back {count} tokens: a sequence has gone past the window ({max(seen)} > {self.window} "
                "tokens), so the ring has overwritten the tokens a rollback would need. Rollback-based generation "
                "(assisted or prompt-lookup decoding) works only while every sequence fits in the window."
            )
        self._progress.seen = [s - count for s in seen]
        self._progress.columns -= count
