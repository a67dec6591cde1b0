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


def layer_windows(config: PreTrainedConfig, window: int | None = None) -> tuple[int | None, ...]:
    """Per decoder layer, the window it attends over, or ``None`` for a layer that attends over every token.

    ``window`` is the caller's override (`enable(model, window=W)`); it is honoured only where the model reads its
    window from the config at run time (configs without ``layer_types``, such as Mistral's). Raises ``ValueError``
    with what to do for every config the rolling cache would answer differently from Transformers.
    """
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"window must be a positive int, got {window!r}.")
    text = _text_config(config)
    configured = getattr(text, "sliding_window", None)
    explicit_types = getattr(text, "layer_types", None)
    if explicit_types is None:
        if configured is not None:
            _check_window(configured)
        layer_types, _ = get_layer_types_and_kwargs(text)
        if window is not None:  # the model reads config.sliding_window at run time: every layer slides over it
            layer_types = [SLIDING if kind == FULL else kind for kind in layer_types]
        _check_kinds(layer_types)
        if SLIDING not in layer_types:
            raise ValueError(
                "This model's config has no sliding window (sliding_window is None), so none of its layers slides. "
                "Pass hf_rolling_cache.enable(model, window=W) to make every layer slide over W tokens (the model "
                "then attends over W tokens in Transformers' path too), or use Transformers' own cache."
            )
        return tuple((window or configured) if kind == SLIDING else None for kind in layer_types)

    layer_types = list(explicit_types)
    _check_kinds(layer_types)
    if SLIDING not in layer_types:
        raise ValueError(
            f"No layer of this {type(text).__name__} slides: its layer_types are all 'full_attention' (for Qwen-style "
            "configs, use_sliding_window=False), so Transformers attends over every token in every layer, and "
            "it fixed that when the model was built. A rolling cache would window the layers and compute something "
            "else. Use Transformers' own cache for this model, or build it from a config whose layers slide."
        )
    if configured is None:
        raise ValueError(
            f"This {type(text).__name__} has sliding layers in layer_types but no sliding_window: set it in the "
            "config before building the model."
        )
    _check_window(configured)
    if window is not None and window != configured:
        raise ValueError(
            f"window={window} differs from this model's sliding_window={configured}, and the model fixed which layers "
            "slide, and over what window, when it was built (its config has layer_types): the rolling cache must "
            "keep that window. Drop window=, or build the model from a config with the window you want."
        )
    return tuple(configured if kind == SLIDING else None for kind in layer_types)


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
    if supports is not None and not supports():
        raise ValueError(
            f"{type(model).__name__} keeps its own kind of cache (recurrent or linear-attention state), which a "
            "rolling cache cannot replace. Use Transformers' own generate for this model."
        )
