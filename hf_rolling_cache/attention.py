"""The "rolling_xformers" attention and mask functions, registered with Transformers' interfaces.

Data flows one way per forward: the mask function records the batch's padding layout (`RollingMask`); the first
layer to attend builds the step plan from it and the cache's counters; every layer then packs its real tokens,
writes its ring and attends, with that one plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from ._kernels import attend_packed, attend_ring
from ._plan import DeviceDecodePlan, Phase, StepPlan, build_plan, query_layout
from .cache import ATTENTION_NAME, RollingSlidingWindowCache, StagedKV


@dataclass(eq=False)
class RollingMask:
    """What every layer of one forward receives as ``attention_mask``: the padding layout, and the plan built
    from it (once, by the first layer that attends)."""

    batch_size: int
    q_length: int
    window: int | None  # the window Transformers built this mask for (its local_size); None: a full causal mask
    padding_mask: torch.Tensor | None  # Transformers' 2D mask, True for real tokens
    device: torch.device | None = None
    num_layers: int | None = None  # the model's, to check the cache against before anything is written
    max_positions: int | None = None  # the model's max_position_embeddings
    _plan: StepPlan | DeviceDecodePlan | None = field(default=None, repr=False)

    def plan_for(self, cache: RollingSlidingWindowCache | None) -> StepPlan | DeviceDecodePlan:
        if self._plan is None:
            self._plan = self._build(cache)
        return self._plan

    def _build(self, cache: RollingSlidingWindowCache | None) -> StepPlan | DeviceDecodePlan:
        window = self.window
        if cache is not None and self.num_layers is not None and self.num_layers != len(cache.layers):
            raise ValueError(
                f"This cache was built for {len(cache.layers)} layers but the model has {self.num_layers}: build the "
                "cache from this model's config, RollingSlidingWindowCache(config=model.config)."
            )
        if cache is not None:
            if window != cache.window:
                raise ValueError(
                    f"Transformers built this forward's mask for {_attends(window)}, but the rolling cache holds a "
                    f"window of {cache.window}: the model does not slide the way the cache does. Build the cache "
                    "from this model's config, or use hf_rolling_cache.enable(model)."
                )
        if window is None:
            raise ValueError(
                "rolling_xformers needs a sliding window, and this model attends over every token (Transformers "
                "built a full causal mask): set model.config.sliding_window for a model that reads it (or use "
                "hf_rolling_cache.enable(model, window=W)), or use Transformers' own attention."
            )
        if cache is not None and cache.decode_on_device and self.q_length == 1 and cache.get_seq_length() > 0:
            device = self.device or (self.padding_mask.device if self.padding_mask is not None else cache.layers[0].device)
            return cache.device_decode_plan(self.padding_mask, device)
        q_seqlens, history = query_layout(self.padding_mask, self.batch_size, self.q_length)
        seen = cache.seen_for(self.batch_size) if cache is not None else (0,) * self.batch_size
        plan = build_plan(window=window, q_length=self.q_length, q_seqlens=q_seqlens, seen=seen)
        if cache is not None:
            columns = None if self.padding_mask is None else self.padding_mask.shape[1]
            cache.begin_step(plan, history, columns)
            if self.max_positions is not None and max(plan.seen_after) > self.max_positions:
                cache.warn_positions_once(max(plan.seen_after), self.max_positions)
        return plan


def rolling_mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int | None = None,
    q_offset: int | None = None,
    kv_offset: int | None = None,
    attention_mask: torch.Tensor | None = None,
    config=None,
    **kwargs,
) -> RollingMask:
    """Transformers' mask hook: instead of a dense mask, keep the 2D padding mask for the step plan."""
    _check_mask_function(kwargs.get("mask_function"), kwargs.get("local_size"))
    return RollingMask(
        batch_size=batch_size,
        q_length=q_length,
        window=kwargs.get("local_size"),
        padding_mask=attention_mask,
        device=kwargs.get("device"),
        num_layers=getattr(config, "num_hidden_layers", None),
        max_positions=getattr(config, "max_position_embeddings", None),
    )


def _attends(window: int | None) -> str:
    return "every token (a full causal mask)" if window is None else f"a sliding window of {window}"


def _check_mask_function(mask_function, local_size: int | None) -> None:
    """Accept only Transformers' plain causal and sliding-window masks: an overlay (``or_mask_function`` /
    ``and_mask_function``: bidirectional image tokens, packed sequences from ``position_ids``, block overlays) would
    be dropped by the block-diagonal masks, and the model would attend where Transformers does not."""
    if mask_function is None or (mask_function is causal_mask_function and local_size is None):
        return
    if local_size is not None and _is_sliding_causal(mask_function, local_size):
        return
    raise ValueError(
        "rolling_xformers implements Transformers' causal and sliding-window masks only, but this forward asked for "
        "another mask (an or_mask_function/and_mask_function overlay: bidirectional attention, packed sequences "
        "given by position_ids without an attention_mask, or a block overlay). Pass a 2D attention_mask with one "
        "sequence per row, or use Transformers' own attention for this model."
    )


def _closure(function) -> dict:
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _is_sliding_causal(mask_function, window: int) -> bool:
    """True for exactly ``sliding_window_causal_mask_function(window)``: ``and_masks(overlay(window), causal)``."""
    parts = _closure(mask_function).get("mask_functions")
    if mask_function.__qualname__ != "and_masks.<locals>.and_mask" or not parts or len(parts) != 2:
        return False
    overlay, causal = parts
    return (
        causal is causal_mask_function
        and overlay.__qualname__ == "sliding_window_overlay.<locals>.inner_mask"
        and _closure(overlay).get("sliding_window") == window
    )


# Keyword arguments Transformers' models pass that change nothing in what the attention computes.
_INERT_OPTIONS = frozenset({"position_ids", "use_cache", "cache_position", "output_router_logits", "output_hidden_states"})


def _check_options(kwargs: dict, window: int | None, layer_idx: int | None) -> None:
    """Refuse every attention option this function does not implement, instead of dropping it."""
    where = f"layer {layer_idx}" if layer_idx is not None else "this layer"
    if "sliding_window" in kwargs and kwargs["sliding_window"] != window:
        raise ValueError(
            f"The model's {where} attends over sliding_window={kwargs['sliding_window']}, but the rolling cache holds "
            f"a window of {window} for it. Build the cache from this model's config (after any change to its "
            "sliding_window), or use hf_rolling_cache.enable(model), which does."
        )
    if kwargs.get("is_causal") is False:
        raise ValueError("rolling_xformers is causal attention; this layer asked for non-causal (is_causal=False).")
    if kwargs.get("output_attentions"):
        raise ValueError(
            "rolling_xformers does not return attention weights (it never materializes them): drop "
            "output_attentions=True, or use attn_implementation='eager' for this call."
        )
    unknown = sorted(
        name for name, value in kwargs.items()
        if name not in _INERT_OPTIONS and name not in ("sliding_window", "is_causal", "output_attentions")
        and value is not None and value is not False
    )
    if unknown:
        raise ValueError(
            f"rolling_xformers does not implement the attention option(s) {unknown} that this model passes; it "
            "refuses them rather than compute something else. Use Transformers' own attention for this model."
        )


def rolling_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | StagedKV,
    value: torch.Tensor | StagedKV,
    attention_mask: RollingMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Rolling-window attention for one layer; shaped like Transformers' ``sdpa_attention_forward``.

    ``query`` is ``[B, H_q, q, D]``; ``key``/``value`` are the `StagedKV` of a `RollingSlidingWindowCache`, or
    plain ``[B, H_kv, q, D]`` tensors when no cache is used. Returns ``[B, q, H_q, D]`` (zeros at padding).
    """
    if not isinstance(attention_mask, RollingMask):
        raise ValueError(
            "rolling_xformers attention got a precomputed attention mask; it needs the model's 2D padding mask. "
            "Pass attention_mask as [batch, length] (1 = token, 0 = padding), not a 4D mask."
        )
    if dropout:
        raise ValueError("rolling_xformers is an inference attention: it does not apply dropout (use model.eval()).")
    if isinstance(key, StagedKV):
        cache, layer, new_keys, new_values = key.cache, key.layer, key.keys, key.values
    else:
        if key.shape[-2] != query.shape[-2]:
            raise ValueError(
                "rolling_xformers attention needs a RollingSlidingWindowCache as past_key_values (it got a cache of "
                f"another kind, holding {key.shape[-2]} keys for {query.shape[-2]} queries). Pass "
                "past_key_values=RollingSlidingWindowCache(config=model.config), or call hf_rolling_cache.enable(model)."
            )
        cache, layer, new_keys, new_values = None, None, key, value
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window = cache.window if cache is not None else attention_mask.window
    _check_options(kwargs, window, key.layer_idx if cache is not None else None)
    if query.is_cuda:  # kernels and copies on this layer's device, whichever device is current (split models)
        with torch.cuda.device(query.device):
            return _attend(query, attention_mask, cache, layer, key, new_keys, new_values, scaling)
    return _attend(query, attention_mask, cache, layer, key, new_keys, new_values, scaling)


def _attend(query, attention_mask, cache, layer, key, new_keys, new_values, scaling):
    plan = attention_mask.plan_for(cache)
    if plan.phase is Phase.DECODE:  # one token per sequence: write it, then attend over the whole ring
        slots, keep = plan.decode_slots(query.device)
        layer.write_decode(new_keys[:, :, 0], new_values[:, :, 0], slots, keep)
        out = attend_ring(query, layer.keys, layer.values, plan.key_bias(query.device, query.dtype), scaling)
        cache.layer_written(plan, key.layer_idx)
        return out, None

    indices = plan.indices(query.device)
    packed_query = _pack(query, indices.query_index)  # [T, H_q, D]
    packed_keys = _pack(new_keys, indices.query_index)  # [T, H_kv, D]
    packed_values = _pack(new_values, indices.query_index)
    if plan.phase is Phase.SUBSEQUENT_PREFILL:  # the unrotated cache ++ the chunk
        keys, values = layer.unrotated_with(packed_keys, packed_values, plan, indices)
    else:  # first chunk: nothing cached yet
        keys, values = packed_keys, packed_values
    out = attend_packed(packed_query, keys, values, plan, scaling)
    if cache is not None:  # attend, then write
        layer.write(packed_keys, packed_values, indices)
        cache.layer_written(plan, key.layer_idx)
    return _unpack(out, indices.query_index, query.shape[0], query.shape[2]), None


def _pack(states: torch.Tensor, query_index: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, q, D]`` -> the real tokens as ``[T, H, D]``, sequence after sequence."""
    batch, heads, length, head_dim = states.shape
    flat = states.transpose(1, 2).reshape(batch * length, heads, head_dim)
    return flat if query_index is None else flat.index_select(0, query_index)


def _unpack(packed: torch.Tensor, query_index: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Packed ``[T, H, D]`` -> ``[B, q, H, D]``, zeros where the batch had padding."""
    if query_index is None:
        return packed.view(batch, length, *packed.shape[1:])
    out = packed.new_zeros(batch * length, *packed.shape[1:])
    out.index_copy_(0, query_index, packed)
    return out.view(batch, length, *packed.shape[1:])


def register() -> None:
    """Register "rolling_xformers" with Transformers' attention and mask interfaces (done on import)."""
    # Under torch.compile (use_cuda_graphs(compile=True), or a user's own) the attention is a graph break: its
    # plan and bookkeeping are Python, and its kernels are already the fused ones.
    AttentionInterface.register(ATTENTION_NAME, torch.compiler.disable(rolling_attention_forward))
    AttentionMaskInterface.register(ATTENTION_NAME, rolling_mask_interface)
