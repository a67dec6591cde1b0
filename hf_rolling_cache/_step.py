"""The step ledger: one forward of the model through the cache, from the first layer that attends to the last.

A forward is opened once, for all layers and both mask kinds (a hybrid model's sliding and global layers each get
their own mask from Transformers, but it is one step): its layout (who is real, how many tokens each sequence had)
is read once, and each layer kind gets its plan from it. Every layer then writes its storage and says so; when the
last one has, the step is committed: the counters advance, once. A forward that stops half way (an exception, an
interrupt) leaves layers that disagree, and the ledger refuses to go on. CUDA graph decoding discards what its
warm-up counted and commits each replayed step: it talks to the ledger, never to the counters.

    ledger.plan(mask, layer)    # the first layer of a forward opens the step; later ones (either kind) join it
    ledger.layer_written(plan, layer_idx)   # ... the last one commits
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

from ._plan import DeviceDecodePlan, StepPlan, build_plan, query_layout


class Counters:
    """Real tokens per sequence (``seen``), and columns processed (padding included), shared by all layers.

    A decode step planned on the device (the one a CUDA graph replays) advances ``device_seen`` in place, without
    a host sync; the host list catches up lazily, the first time it is read.
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

    def lower_bound(self) -> int:
        """The fewest real tokens any sequence holds, as far as the host knows without a sync (the device counters
        only grow, so the host list, however stale, bounds them from below)."""
        return min(self._seen, default=0)

    def on_device(self, device: torch.device) -> torch.Tensor:
        """The counters as a device tensor, made once and then kept in step with the host list."""
        if self.device_seen is None or self.device_seen.device != device:
            self.device_seen = torch.tensor(self.seen, dtype=torch.long, device=device)
        return self.device_seen

    def advanced_on_device(self) -> None:
        self._host_stale = True


class _ForwardClock(threading.local):
    """Tells which masks belong to one forward: Transformers builds every mask of a forward before its first layer
    attends, so masks made with no attention in between share a forward. Per thread."""

    def __init__(self) -> None:
        self.forward = 0
        self.attended = True

    def mask_made(self) -> int:
        if self.attended:
            self.forward += 1
            self.attended = False
        return self.forward

    def attending(self) -> None:
        self.attended = True


clock = _ForwardClock()


class _Step:
    """A forward in progress: its layout, one plan per layer kind, and which layers have written."""

    def __init__(self, forward: int, q_length: int, seen: tuple[int, ...], q_seqlens: tuple[int, ...] | None,
                 device_counters: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.forward = forward
        self.q_length = q_length
        self.seen = seen  # host plans
        self.q_seqlens = q_seqlens  # host plans; None when planned on the device
        self.device_counters = device_counters  # (seen [B], real [B]) for a decode step planned on the device
        self.plans: dict[int | None, StepPlan | DeviceDecodePlan] = {}
        self.mirrors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device counters elsewhere
        self.written: set[int] = set()

    @property
    def seen_after(self) -> tuple[int, ...]:
        return tuple(s + n for s, n in zip(self.seen, self.q_seqlens))


class StepLedger:
    """Opens, joins, commits and discards the cache's forwards. ``reserve(n)`` asks the cache to make its global
    layers hold ``n`` tokens per sequence before a step's plans are built."""

    def __init__(self, num_layers: int, reserve: Callable[[int], None]) -> None:
        self.num_layers = num_layers
        self.counters = Counters()
        self.decode_on_device = False  # plan decode steps on the device (set by CUDA graph decoding)
        self.last_plan: StepPlan | DeviceDecodePlan | None = None
        self._reserve = reserve
        self._open: _Step | None = None
        self._step_real: torch.Tensor | None = None  # [B] this decode step's real flags, a static buffer
        self._warned = False
        # A CUDA graph captured in one segment per device cannot advance counters that live on the first device
        # from a later segment: it sets this and advances them after its replays (`commit_replayed(advance=True)`).
        self.defer_advance = False
        # The walkthrough's per-sequence chunks (mistral-inference's packing) leave a sequence without tokens in a
        # later forward; its window counts its own tokens there, as in the article. generate never does this.
        self.allow_holes = False
        # A forward that runs its first layers only (`_reach`: a prefill chunk whose outputs nobody reads) commits
        # its step once that many have written; the layers above keep what they held in the slots of its columns,
        # which nothing reads. Set by `_reach` around such a forward; None: every layer.
        self.layers_run: int | None = None

    # --- a forward --------------------------------------------------------------------------------------------------
    def plan(self, mask, window: int | None, capacity: Callable[[], int]) -> StepPlan | DeviceDecodePlan:
        """The plan of ``mask``'s forward for layers of ``window`` (``capacity()``: their slots per sequence)."""
        step = self._open
        if step is None or step.forward != mask.forward:
            self.check_usable()
            step = self._open = self._begin(mask)
        if window not in step.plans:
            if step.device_counters is not None:
                seen, real = step.device_counters
                slots = capacity()
                step.plans[window] = DeviceDecodePlan(
                    window=window, capacity=slots, seen=seen, real=real, mirrors=step.mirrors,
                    full=self.rings_full(window, slots))
            else:
                step.plans[window] = build_plan(
                    window=window, q_length=step.q_length, q_seqlens=step.q_seqlens, seen=step.seen,
                    capacity=capacity(),
                )
        return step.plans[window]

    def layer_written(self, plan: StepPlan | DeviceDecodePlan, layer_idx: int) -> None:
        """Count a layer as written; once every layer has, the forward is committed."""
        step = self._open
        assert step is not None and step.plans.get(plan.window) is plan, "layer_written outside its forward"
        step.written.add(layer_idx)
        if len(step.written) == (self.layers_run or self.num_layers):
            if step.device_counters is not None:
                if not self.defer_advance:
                    seen, real = step.device_counters
                    seen.add_(real)  # on the device, no sync (captured into a CUDA graph too)
                self.counters.advanced_on_device()
            else:
                self.counters.seen = list(step.seen_after)
            self.counters.columns += step.q_length
            self._open = None
            self.last_plan = plan

    def commit_replayed(self, advance: bool = False) -> None:
        """A replayed decode step (a CUDA graph) ran: count its column. ``advance``: the graph did not advance the
        device counters itself (it was captured with `defer_advance`), so advance them here, in stream order."""
        if advance:
            self.counters.device_seen.add_(self._step_real)
        self.counters.columns += 1
        self.counters.advanced_on_device()

    def rings_full(self, window: int | None, capacity: int) -> bool:
        """Whether a ring of ``capacity`` slots for ``window`` holds a whole window in every row before this step,
        as far as the host knows: then every slot is attended and the decode step needs no key mask. A ring with
        slack (for rollbacks) always has slots outside the window."""
        return window is not None and capacity == window and self.counters.lower_bound() >= window

    def decode_step_open(self) -> bool:
        """A decode step planned on the device has begun (some layer has planned it) and is not committed."""
        return self._open is not None and self._open.device_counters is not None

    def stage_on(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the open decode step's device counters on ``device``, made now (outside any capture), for
        the step's plans to read there: a CUDA graph segment on ``device`` reads these copies. Returns the
        ``(source, copy)`` pairs a replay refreshes before that segment runs."""
        step = self._open
        if step is None or step.device_counters is None or step.device_counters[0].device == device:
            return []
        if device not in step.mirrors:
            seen, real = step.device_counters
            step.mirrors[device] = (seen.to(device), real.to(device))
        return list(zip(step.device_counters, step.mirrors[device]))

    @contextlib.contextmanager
    def discarding(self) -> Iterator[None]:
        """Steps inside the block change nothing (a graph's warm-up and capture, every row padding): their columns
        are not counted."""
        columns = self.counters.columns
        try:
            yield
        finally:
            self.counters.columns = columns
            self._open = None

    def check_usable(self, layer_idx: int | None = None) -> None:
        """Raise if an earlier forward was interrupted after writing some layers (their storage now disagrees).

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
            f"A previous forward stopped after writing {len(step.written)} of {self.num_layers} layers (an "
            "exception or an interrupt), so the layers no longer hold the same tokens. This cache cannot be used "
            "further: call cache.reset() or create a new RollingSlidingWindowCache."
        )

    def reset(self) -> None:
        self.counters.seen = []
        self.counters.columns = 0
        self._open = None
        self.last_plan = None

    # --- opening a step ---------------------------------------------------------------------------------------------
    def _begin(self, mask) -> _Step:
        counters = self.counters
        if mask.num_layers is not None and mask.num_layers != self.num_layers:
            raise ValueError(
                f"This cache was built for {self.num_layers} layers but the model has {mask.num_layers}: build the "
                "cache from this model's config, RollingSlidingWindowCache(config=model.config)."
            )
        if self.decode_on_device and mask.q_length == 1 and counters.columns > 0:
            return self._begin_on_device(mask)
        q_seqlens, history = query_layout(mask.padding_mask, mask.batch_size, mask.q_length)
        seen = tuple(counters.seen) if counters.seen else (0,) * mask.batch_size
        columns = None if mask.padding_mask is None else mask.padding_mask.shape[1]
        self._check_history(mask.q_length, seen, history, columns)
        holes = [b for b, (s, n) in enumerate(zip(seen, q_seqlens)) if s and n < mask.q_length]
        if holes and not self.allow_holes:
            raise ValueError(
                f"Sequences {holes} have padding after tokens this cache already holds (a hole between turns). "
                "Transformers' sliding window counts padding columns, so it would answer differently from a ring of "
                "real tokens. Continue with the same number of new tokens in every row, or pass the whole "
                "conversation, left padded, to a new RollingSlidingWindowCache."
            )
        step = _Step(mask.forward, mask.q_length, seen, tuple(q_seqlens), None)
        self._reserve(max(step.seen_after))
        if mask.max_positions is not None and max(step.seen_after) > mask.max_positions and not self._warned:
            self._warned = True  # once per cache: rotary positions past what the model was trained for
            warnings.warn(
                f"Sequences have reached position {max(step.seen_after)}, past the model's max_position_embeddings "
                f"({mask.max_positions}). The rolling cache keeps working, but the model was not trained on such "
                "positions and its output may degrade.",
                stacklevel=2,
            )
        return step

    def _check_history(self, q_length: int, seen: tuple[int, ...], history, mask_columns: int | None) -> None:
        columns, held = self.counters.columns, self.counters.seen
        if mask_columns is not None and mask_columns != columns + q_length:
            raise ValueError(
                f"The attention_mask has {mask_columns} columns, but this cache has processed {columns} and this "
                f"forward brings {q_length}. Pass the mask of the whole conversation so far (as generate does), or "
                "a new cache for a new batch."
            )
        if held and mask_columns is None and any(s != columns for s in held):
            raise ValueError(
                f"This forward has no attention_mask, which says no sequence has padding, but this cache holds padded "
                f"sequences ({list(held)} real tokens in {columns} columns). It belongs to another batch: pass a new "
                "RollingSlidingWindowCache (or call cache.reset()), or pass the attention_mask."
            )
        if held and history is not None and list(history) != list(seen):
            raise ValueError(
                f"The attention_mask says the sequences had {list(history)} real tokens before this forward, but "
                f"this cache holds {list(seen)}. The cache belongs to another batch or conversation: pass a new "
                "RollingSlidingWindowCache (or call cache.reset())."
            )

    def _begin_on_device(self, mask) -> _Step:
        """A decode step planned on the device: no host sync, static shapes (what a CUDA graph captures).

        The mask's padding is the whole 2D mask (``[B, columns + 1]``) or this step's column alone (``[B, 1]``).
        """
        padding_mask, columns, batch = mask.padding_mask, self.counters.columns, self.counters.batch_size
        if padding_mask is not None and padding_mask.shape[1] not in (1, columns + 1):
            raise ValueError(
                f"The attention_mask has {padding_mask.shape[1]} columns, but this cache has processed {columns} and "
                "a decode step brings 1. Pass the mask of the whole conversation so far (as generate does), or a "
                "new cache for a new batch."
            )
        if padding_mask is not None and padding_mask.shape[0] != batch:
            raise ValueError(f"This cache holds a batch of {batch} sequences, not {padding_mask.shape[0]}.")
        device = mask.device or (padding_mask.device if padding_mask is not None else None)
        if self._step_real is None or self._step_real.device != device or self._step_real.numel() != batch:
            self._step_real = torch.ones(batch, dtype=torch.long, device=device)
        if padding_mask is None:
            self._step_real.fill_(1)
        else:
            self._step_real.copy_(padding_mask[:, -1])
        self._reserve(columns + 1)  # a bound on every sequence's tokens after this step
        seen = self.counters.on_device(device)
        return _Step(mask.forward, 1, (), None, (seen, self._step_real))

    @property
    def step_buffers(self) -> tuple[int, int] | None:
        """Addresses of the device counters a captured step reads (None before the first device-planned step)."""
        if self.counters.device_seen is None or self._step_real is None:
            return None
        return self.counters.device_seen.data_ptr(), self._step_real.data_ptr()
