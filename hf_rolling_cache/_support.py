"""What the rolling cache accepts: which layers of a model slide, over which window, as Transformers decides it.

Every refusal of a model or config lives here, so `enable`, the cache and the attention function agree on one
answer, given up front, before anything is generated. A model we would window differently from Transformers'
own path is refused: a silently different answer is worse than an error.
"""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

SLIDING = "sliding_attention"
FULL = "full_attention"


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


# Families whose config has a window that their attention does not apply as a plain sliding window: Moshi masks
# its prompt causally and windows only in Transformers' cache; Doge adds learned key biases and keeps the top keys.
_NOT_PLAIN_SLIDING = {"moshi": "windows only through Transformers' cache", "doge": "selects keys dynamically"}


def layer_windows(config: PreTrainedConfig, window: int | None = None) -> tuple[int | None, ...]:
    """Per decoder layer, the window it attends over, or ``None`` for a layer that attends over every token.

    The layer kinds are Transformers' own (``get_layer_types_and_kwargs``: explicit ``layer_types``, shared-KV
    layers, per-layer configs). ``window`` is the caller's override (`enable(model, window=W)`); it is honoured only
    where the model reads its window from the config at run time (configs without ``layer_types``, such as
    Mistral's). Raises ``ValueError`` with what to do for every config the rolling cache would answer differently
    from Transformers.
    """
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"window must be a positive int, got {window!r}.")
    text = _text_config(config)
    model_type = getattr(text, "model_type", "")
    if model_type in _NOT_PLAIN_SLIDING:
        raise ValueError(
            f"{type(text).__name__}'s attention is not a plain sliding window ({_NOT_PLAIN_SLIDING[model_type]}): "
            "a rolling cache would compute something else. Use Transformers' own cache for this model."
        )
    configured = getattr(text, "sliding_window", None)
    explicit = getattr(text, "layer_types", None) is not None
    layer_types, per_layer = get_layer_types_and_kwargs(text)
    _check_kinds(layer_types)
    if not explicit and window is not None:  # the model reads config.sliding_window at run time: every layer slides
        return (window,) * len(layer_types)
    if SLIDING not in layer_types:
        if explicit:
            raise ValueError(
                f"No layer of this {type(text).__name__} slides: its layer_types are all 'full_attention' (for "
                "Qwen-style configs, use_sliding_window=False), so Transformers attends over every token in every "
                "layer, and it fixed that when the model was built. A rolling cache would window the layers and "
                "compute something else. Use Transformers' own cache for this model, or build it from a config "
                "whose layers slide."
            )
        raise ValueError(
            "This model's config has no sliding window (sliding_window is None), so none of its layers slides. Pass "
            "hf_rolling_cache.enable(model, window=W) to make every layer slide over W tokens (the model then "
            "attends over W tokens in Transformers' path too), or use Transformers' own cache."
        )
    windows = tuple(kwargs.get("sliding_window") if kind == SLIDING else None for kind, kwargs in zip(layer_types, per_layer))
    if any(kind == SLIDING and w is None for kind, w in zip(layer_types, windows)):
        raise ValueError(
            f"This {type(text).__name__} has sliding layers in layer_types but no sliding_window: set it in the "
            "config before building the model."
        )
    sliding = {w for w in windows if w is not None}
    for w in sliding:
        _check_window(w)
    if len(sliding) > 1:
        raise ValueError(
            f"This model's sliding layers use different windows {sorted(sliding)}; Transformers masks them all with "
            "one window. Use Transformers' own cache for this model."
        )
    if window is not None and window not in sliding:
        raise ValueError(
            f"window={window} differs from this model's sliding_window={configured}, and the model fixed which layers "
            "slide, and over what window, when it was built (its config has layer_types): the rolling cache must "
            "keep that window. Drop window=, or build the model from a config with the window you want."
        )
    return windows


def _check_window(window) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ValueError(
            f"The config's sliding_window is {window!r}: no layer slides over a window. A rolling cache needs a "
            "positive window; for a model without one, use Transformers' own cache."
        )


def _check_kinds(layer_types: list[str]) -> None:
    others = sorted({kind for kind in layer_types if kind not in (SLIDING, FULL)})
    if others:
        raise ValueError(
            f"This model has layers of kind {others} (not 'sliding_attention' or 'full_attention'): recurrent, "
            "convolutional, chunked or shared-KV layers keep state a rolling cache does not hold. Use "
            "Transformers' own cache for this model."
        )


def check_model(model) -> None:
    """Refuse models that bring their own cache or whose generate cannot take a Transformers `Cache`."""
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if getattr(model, "_is_stateful", False) or (supports is not None and not supports()):
        raise ValueError(
            f"{type(model).__name__} keeps its own kind of cache (recurrent or linear-attention state), which a "
            "rolling cache cannot replace. Use Transformers' own generate for this model."
        )
