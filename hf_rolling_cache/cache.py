"""`RollingSlidingWindowCache`: exactly ``window`` slots per sliding layer and sequence, written in place; every
token for a hybrid model's global layers.

The cache owns the layers' storage (``_layers.py``) and the step ledger (``_step.py``) that counts what they hold.
It does not decide who is real or which mask to use: the step plan does (``_plan.py``), and the attention function
writes the storage with it (``attention.py``). `update` therefore only checks and stages a layer's new keys and
values for that attention function.
"""

from __future__ import annotations

import operator

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache

from ._fp8 import Fp8KVLayer, check_kv_dtype
from ._layers import KVLayer, StagedKV
from ._plan import DeviceDecodePlan, StepPlan
from ._ring import slot_positions
from ._step import StepLedger
from ._support import FULL, SLIDING, layer_windows

ATTENTION_NAME = "rolling_xformers"
_FIRST_GLOBAL_CAPACITY = 256  # slots per sequence a global layer starts with when no max_length is given


class RollingSlidingWindowCache(Cache):
    """A rolling-buffer KV cache for sliding-window models: per sliding layer and sequence exactly ``window`` slots,
    the token at position p in slot ``p % window``, written in place, never grown, never rolled. A hybrid model's
    global (full-attention) layers keep every token, each in slot = position.

    Use it with ``attn_implementation="rolling_xformers"``::

        cache = RollingSlidingWindowCache(config=model.config)
        model.generate(**batch, past_key_values=cache, prefill_chunk_size=model.config.sliding_window)

    Args:
        config: the model's config: which layers slide and over what window, as Transformers decides it
            (``layer_types``, ``sliding_window``).
        window: the window, if the config has none (every layer then slides over it); it must agree with the
            config's when both are given.
        num_layers: the number of decoder layers, if no config is given (every layer slides).
        max_length: tokens per sequence the global layers hold without growing (prompt + new tokens); by default
            they start small and double when full.
        slack: extra ring slots, so that a generation can roll back up to ``slack + 1`` tokens exactly (assisted
            and prompt-lookup decoding verify a few draft tokens, then `crop` the rejected ones): a ring of
            ``window + slack`` slots still holds what the next token's window needs after such a rollback.
            ``enable`` sets it for assisted generations.
        kv_dtype: how keys and values are stored: ``None`` (the default) in the model's dtype;
            ``torch.float8_e4m3fn`` as an 8-bit ring (every layer, global ones too): e4m3 codes with one float16
            scale per token and kv head, (D + 4) / (2 D) of a bf16 ring's bytes, read back in the model's dtype
            (`_fp8.Fp8KVLayer`). Head dimensions must be divisible by 4.
    """

    def __init__(
        self,
        config: PreTrainedConfig | None = None,
        *,
        window: int | None = None,
        num_layers: int | None = None,
        max_length: int | None = None,
        slack: int = 0,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        windows = self._windows(config, window, num_layers)
        check_kv_dtype(kv_dtype)
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}.")
        if not isinstance(slack, int) or isinstance(slack, bool) or slack < 0:
            raise ValueError(f"slack must be a non-negative int, got {slack!r}.")
        self.window = next(w for w in windows if w is not None)
        self.slack = slack
        self.kv_dtype = kv_dtype
        self.config = config
        self.ledger = StepLedger(len(windows), self.reserve)
        self._global_capacity = max_length or 0
        self.decode_graph = None  # _decode_graph.DecodeGraph, captured by CUDA graph decoding
        # Per row, the most tokens it has held since the last reset, as of the last crop (the counters only grow in
        # between): a ring wrapped past it has overwritten what a rollback far below it would need (`crop`).
        self._held_most: list[int] = []
        self.replayed_by = None  # weakref to the use_cuda_graphs model that last ran on it (graphs.replays_steps)
        self.decode_graph_warmup_s: float | None = None  # seconds the last decode graph took to warm up and capture
        counters = self.ledger.counters
        kind = KVLayer if kv_dtype is None else Fp8KVLayer
        super().__init__(
            layers=[kind(w, counters, w + slack if w is not None else self._global_capacity) for w in windows]
        )

    @staticmethod
    def _windows(config, window: int | None, num_layers: int | None) -> tuple[int | None, ...]:
        if config is None:
            if window is None or num_layers is None:
                raise ValueError(
                    "RollingSlidingWindowCache needs the model's config, or window=W and num_layers=N (every layer "
                    "then slides over W tokens)."
                )
            if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
                raise ValueError(f"window must be a positive int, got {window!r}.")
            return (window,) * num_layers
        config_window = getattr(config, "sliding_window", None)
        if window is not None and config_window is not None and window != config_window:
            raise ValueError(
                f"window={window} disagrees with the model's sliding_window={config_window}. The cache must hold the "
                "window the model attends over: drop window=, or set model.config.sliding_window first."
            )
        windows = layer_windows(config, window)
        if num_layers is not None and num_layers != len(windows):
            raise ValueError(f"num_layers={num_layers} disagrees with the config's {len(windows)} layers.")
        return windows

    def __repr__(self) -> str:
        kinds = f"{sum(layer.is_sliding for layer in self.layers)} sliding + {len(self.global_layers)} global"
        stored = "" if self.kv_dtype is None else f", kv_dtype={self.kv_dtype}"
        return (
            f"{type(self).__name__}(window={self.window}, layers={len(self.layers)} ({kinds}), "
            f"batch={self.ledger.counters.batch_size or None}, seen={self.ledger.counters.seen}{stored})"
        )

    # --- what the model calls --------------------------------------------------------------------------------------
    @torch.compiler.disable  # a graph break under torch.compile: host-side checks and bookkeeping, no kernels
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Check and stage a layer's new keys and values; the "rolling_xformers" attention writes and reads them.

        Returns the same `StagedKV` twice (as the key and the value argument of the attention function).
        """
        layer_idx = operator.index(layer_idx)  # a 0-d tensor while compiled layers are swapped in (graphs.py)
        # A config that names its attention (the model's own) is checked here, before anything is allocated; one
        # that does not (a copy loaded from the checkpoint) is checked by the staged keys, which refuse to be read
        # by any attention function but ours.
        implementation = getattr(self.config, "_attn_implementation", None)
        if implementation is not None and implementation != ATTENTION_NAME:
            raise ValueError(
                f"RollingSlidingWindowCache works only with attn_implementation='{ATTENTION_NAME}', but the model "
                f"uses '{implementation}'. Call model.set_attn_implementation('{ATTENTION_NAME}') after "
                "`import hf_rolling_cache`, or use Transformers' own caches with other attention implementations."
            )
        self.ledger.check_usable(layer_idx)
        batch = self.ledger.counters.batch_size
        if batch and key_states.shape[0] != batch:
            raise ValueError(
                f"This cache holds a batch of {batch} sequences but the model was called with a batch of "
                f"{key_states.shape[0]}. A RollingSlidingWindowCache serves one batch: create a new cache "
                "(or call cache.reset()) for another batch."
            )
        self.layers[layer_idx].update(key_states, value_states)
        staged = StagedKV(self, layer_idx, key_states, value_states)
        return staged, staged

    def reserve(self, tokens: int) -> None:
        """Make the global layers hold ``tokens`` per sequence (they double, so growing stays linear); rings never
        change. Called by the step ledger before each step, and by CUDA graph decoding before a replay."""
        if tokens <= self._global_capacity:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # new storage inside a capture would come from the graph's pool, its copy never executed: a replay
            # would read the freed old buffer. CUDA graph decoding reserves before it captures.
            raise RuntimeError(
                f"A global layer would grow to hold {tokens} tokens during a CUDA graph capture. This is a bug in "
                "hf_rolling_cache: please report it; release_cuda_graphs(model) decodes eagerly meanwhile."
            )
        self._global_capacity = max(tokens, 2 * self._global_capacity, _FIRST_GLOBAL_CAPACITY)
        for layer in self.global_layers:
            layer.grow(self._global_capacity)

    @property
    def global_layers(self) -> list[KVLayer]:
        return [layer for layer in self.layers if not layer.is_sliding]

    @property
    def decode_on_device(self) -> bool:
        """Plan decode steps on the device (no host sync, static shapes): set by CUDA graph decoding."""
        return self.ledger.decode_on_device

    @decode_on_device.setter
    def decode_on_device(self, value: bool) -> None:
        self.ledger.decode_on_device = value

    @property
    def last_plan(self) -> StepPlan | DeviceDecodePlan | None:
        """The plan of the last committed forward (of the last layer kind that wrote)."""
        return self.ledger.last_plan

    # --- inspection ------------------------------------------------------------------------------------------------
    @property
    def seen(self) -> list[int]:
        """Real tokens processed per sequence (its next position), empty before the first forward."""
        return list(self.ledger.counters.seen)

    def slot_positions(self) -> list[list[int]]:
        """Per sequence, the position each slot of a sliding layer's ring (``window + slack`` slots) holds (``-1`` if
        empty)."""
        return [slot_positions(s, self.window + self.slack) for s in self.ledger.counters.seen]

    def memory_bytes(self, kind: str | None = None) -> int:
        """Bytes held by the layers' storage: all of them, or only ``kind``'s (``"sliding_attention"``: the rings,
        flat however long the generation runs; ``"full_attention"``: the global layers, which grow)."""
        if kind not in (None, SLIDING, FULL):
            raise ValueError(f"kind must be None, {SLIDING!r} or {FULL!r}, got {kind!r}.")
        return sum(
            layer.memory_bytes()
            for layer in self.layers
            if kind is None or layer.is_sliding == (kind == SLIDING)
        )

    # --- Transformers' cache contract ------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns processed so far, padding included (what generate slices its inputs with)."""
        return self.ledger.counters.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reset(self) -> None:
        """Forget everything. The storage stays allocated and is reused by a batch of the same size; a batch of
        another size gets new storage at its first forward."""
        super().reset()
        self.ledger.reset()
        self.decode_graph = None
        self.replayed_by = None
        self._held_most = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder sequences (beam search): row i becomes old row ``beam_idx[i]``."""
        self.ledger.check_usable()
        rows = beam_idx.tolist()
        super().reorder_cache(beam_idx)
        self._reorder_rows(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.ledger.check_usable()
        rows = indices.tolist()
        super().batch_select_indices(indices)
        self._reorder_rows(rows)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.ledger.check_usable()
        super().batch_repeat_interleave(repeats)
        self._reorder_rows([row for row in range(self.ledger.counters.batch_size) for _ in range(repeats)])

    def _reorder_rows(self, rows: list[int]) -> None:
        """Row i's counters (and rollback limit) become old row ``rows[i]``'s."""
        counters = self.ledger.counters
        if counters.seen:
            counters.seen = [counters.seen[r] for r in rows]
        if self._held_most:
            self._held_most = [self._held_most[r] for r in rows]

    @property
    def is_croppable(self) -> bool:
        """Whether rollbacks of several tokens can be exact now (what assisted decoding needs): a ring with slack
        always holds what a rollback of up to ``slack + 1`` tokens needs; one without, only while no sequence has
        passed its window (it can always roll back one token: see `crop`)."""
        return self.slack > 0 or all(s <= self.window for s in self.ledger.counters.seen)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest ``-tokens_to_remove`` tokens: a negative count, and 0 is a no-op, as Transformers 5's
        caches take it (a positive "length to keep" is their legacy form, which they refuse too).

        Exact while every sequence still holds what the window needs after the rollback: for any count while no
        sequence has wrapped its ring, and otherwise down to ``slack + 1`` tokens below the most a sequence has
        held (so rollbacks one after another count together until new tokens pass that mark). The next token's
        window needs only the ``window - 1`` tokens before it, so the slot the newest token overwrote is one nobody
        reads again: a ring without slack rolls back one token exactly, which a stop check deferred by a step
        needs. Otherwise the tokens a rollback would bring back into the window have been overwritten, and this
        raises, changing nothing.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative count of tokens to remove, as Transformers' caches take it "
                "(a positive length to keep is their legacy form, which they refuse too)."
            )
        count = -tokens_to_remove
        if count == 0:
            return
        self.ledger.check_usable()
        counters = self.ledger.counters
        seen = counters.seen
        if count > counters.columns or any(s < count for s in seen):
            raise ValueError(f"Cannot remove {count} tokens: the sequences hold only {seen}.")
        slots = self.window + self.slack
        known = len(self._held_most) == len(seen)  # else a new batch since the last crop
        held_most = [max(most, s) for most, s in zip(self._held_most, seen)] if known else list(seen)
        if any(most > slots and most - (s - count) > self.slack + 1 for most, s in zip(held_most, seen)):
            raise ValueError(
                f"Cannot roll back {count} tokens: a sequence has gone past its ring ({max(held_most)} > {slots} "
                f"slots), which keeps {self.slack} tokens of slack beyond the window of {self.window} (a ring rolls "
                f"back exactly to {self.slack + 1} tokens below the most it has held, counting earlier rollbacks), so "
                "the ring has overwritten the tokens a rollback would need. Build the cache with slack=N (N: the most "
                "tokens a step may roll back, less one; hf_rolling_cache.enable does this for assisted and "
                "prompt-lookup decoding)."
            )
        self._held_most = held_most
        counters.seen = [s - count for s in seen]
        counters.columns -= count
