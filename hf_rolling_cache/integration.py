"""One switch for a model: `enable` makes plain ``model.generate`` (and so pipelines and Accelerate scripts, which
call it) use the rolling attention with a fresh rolling cache and chunked prefill in every call; `disable` puts
back exactly what `enable` changed."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from . import _reach
from ._fp8 import check_kv_dtype
from ._support import check_model, layer_windows
from .cache import ATTENTION_NAME, RollingSlidingWindowCache

_STATE = "_hf_rolling_cache_enabled"
_MIN_SLACK = 64  # ring slots beyond the window for assisted generations (drafts grow under the heuristic schedule)


@dataclass(frozen=True)
class _Saved:
    attn_implementation: str | None
    sliding_window: int | None
    instance_generate: object | None  # a generate the instance already had (a wrapper of Accelerate's or a user's)
    prefill_chunk_size: int
    kv_dtype: torch.dtype | None  # how the caches enable makes store keys and values


def enable(
    model: PreTrainedModel,
    *,
    window: int | None = None,
    prefill_chunk_size: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> None:
    """Use the rolling cache in every ``model.generate`` call (pipelines and Accelerate scripts included).

    Args:
        window: the sliding window W. When given, it is written to ``model.config.sliding_window``: the model then
            attends over W tokens in every path, the rolling one as Transformers' own (`disable` restores it).
            By default the config's window is used; a config without one needs ``window``.
        prefill_chunk_size: prompt tokens per prefill forward; by default the window, as in "KV Caching in Mistral with Transformers and xFormers".
        kv_dtype: the caches' storage: ``None`` (the model's dtype) or ``torch.float8_e4m3fn`` (an 8-bit ring; see
            `RollingSlidingWindowCache`). A cache passed as ``past_key_values`` keeps its own.

    Each call gets a fresh `RollingSlidingWindowCache` unless one is passed as ``past_key_values`` (to continue a
    conversation). Prefill chunks run only the layers whose keys and values the rest of the generation reads
    (`_reach`: in a long prompt, the early chunks stop below the top layers). Assisted and prompt-lookup decoding roll back the draft tokens they reject: their cache keeps
    a few slots of slack beyond the window so that every rollback is exact.
    """
    if is_enabled(model):
        disable(model)
    config = model.config
    check_model(model)
    windows = layer_windows(config, window)  # refuses, before anything changes, what we would answer differently
    if prefill_chunk_size is not None and (not isinstance(prefill_chunk_size, int) or prefill_chunk_size <= 0):
        raise ValueError(f"prefill_chunk_size must be a positive int, got {prefill_chunk_size!r}.")
    check_kv_dtype(kv_dtype)
    chunk = prefill_chunk_size or max(w for w in windows if w is not None)
    saved = _Saved(config._attn_implementation, getattr(config, "sliding_window", None), vars(model).get("generate"),
                   chunk, kv_dtype)
    if window is not None:
        config.sliding_window = window
    model.set_attn_implementation(ATTENTION_NAME)
    class_generate = model.generate

    @functools.wraps(class_generate)
    def generate(*args, **kwargs):
        if not _uses_cache(model, kwargs):  # Transformers' own path: every step reruns the whole sequence
            return class_generate(*args, **kwargs)
        _refuse_other_caches(model, kwargs)
        _refuse_early_exit(model, kwargs)
        if kwargs.get("past_key_values") is None:
            max_length = _max_length(model, args, kwargs)  # global layers sized once, not grown
            kwargs["past_key_values"] = RollingSlidingWindowCache(
                config=model.config, max_length=max_length, slack=_rollback_slack(model, kwargs),
                kv_dtype=saved.kv_dtype,
            )
        else:
            _check_continuation(kwargs["past_key_values"], args, kwargs)
        _choose_chunking(model, kwargs, saved.prefill_chunk_size)
        return class_generate(*args, **kwargs)

    model.generate = generate
    setattr(model, _STATE, saved)
    _reach.watch(model)


def disable(model: PreTrainedModel) -> None:
    """Undo `enable`: the model's attention implementation, window and ``generate`` as they were."""
    saved = getattr(model, _STATE, None)
    if saved is None:
        return
    if saved.instance_generate is None:
        del model.generate  # the instance attribute; the class's generate shows through again
    else:
        model.generate = saved.instance_generate
    model.config.sliding_window = saved.sliding_window
    if saved.attn_implementation is not None:
        model.set_attn_implementation(saved.attn_implementation)
    delattr(model, _STATE)
    _reach.unwatch(model)


def is_enabled(model: PreTrainedModel) -> bool:
    return getattr(model, _STATE, None) is not None


def _option(model: PreTrainedModel, kwargs: dict, name: str):
    """A generate option as Transformers reads it: the argument, else the generation config passed, else the
    model's."""
    if name in kwargs:
        return kwargs[name]
    generation_config = kwargs.get("generation_config") or model.generation_config
    return getattr(generation_config, name, None)


def _refuse_other_caches(model: PreTrainedModel, kwargs: dict) -> None:
    implementation = _option(model, kwargs, "cache_implementation")
    if implementation is not None:
        raise ValueError(
            f"cache_implementation={implementation!r} asks Transformers for a cache of its own, but "
            "hf_rolling_cache.enable(model) gives every generate call a RollingSlidingWindowCache. Drop "
            "cache_implementation, or call hf_rolling_cache.disable(model) to use Transformers' caches."
        )


def _input_ids(args: tuple, kwargs: dict):
    return kwargs.get("input_ids", args[0] if args else None)


def _check_continuation(cache, args: tuple, kwargs: dict) -> None:
    """A cache passed back continues its conversation: the new input must hold the whole conversation so far."""
    input_ids = _input_ids(args, kwargs)
    held = cache.get_seq_length()
    if held and input_ids is not None and input_ids.shape[-1] <= held:
        raise ValueError(
            f"This cache has processed {held} columns, but the new input_ids have only {input_ids.shape[-1]}. A cache "
            "passed back to generate continues its conversation: pass the whole conversation so far (the previous "
            "output followed by the new tokens), or a new RollingSlidingWindowCache (or cache.reset()) for a new batch."
        )


def _choose_chunking(model: PreTrainedModel, kwargs: dict, default: int) -> None:
    """Chunked prefill unless asked otherwise: an explicit ``prefill_chunk_size`` (``None`` turns it off) is kept;
    prompts given as ``inputs_embeds`` are not chunked (Transformers' chunked prefill splits ``input_ids`` only)."""
    explicit = "prefill_chunk_size" in kwargs or _option(model, kwargs, "prefill_chunk_size") is not None
    if not explicit:
        kwargs["prefill_chunk_size"] = None if kwargs.get("inputs_embeds") is not None else default
    chunk = _option(model, kwargs, "prefill_chunk_size")
    if chunk is not None and kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "Transformers' chunked prefill splits input_ids only, and this call gives the prompt as inputs_embeds: "
            "pass prefill_chunk_size=None (the rolling cache then takes the prompt in one forward)."
        )
    if chunk is not None and _option(model, kwargs, "output_hidden_states"):
        raise ValueError(
            "With chunked prefill, generate returns the hidden states of the last prompt chunk only: pass "
            "prefill_chunk_size=None to get the whole prompt's."
        )


def _max_length(model: PreTrainedModel, args: tuple, kwargs: dict) -> int | None:
    """Columns this generate call can reach (prompt + max_new_tokens), when both are known up front."""
    prompt, new = _input_ids(args, kwargs), _option(model, kwargs, "max_new_tokens")
    if prompt is None or new is None or not hasattr(prompt, "shape"):
        return None
    return prompt.shape[-1] + new


def _uses_cache(model: PreTrainedModel, kwargs: dict) -> bool:
    """``use_cache=False`` (argument or generation config) means no cache at all, and so no chunked prefill: each
    chunk would run without the ones before it."""
    return _option(model, kwargs, "use_cache") is not False


def _refuse_early_exit(model: PreTrainedModel, kwargs: dict) -> None:
    if _option(model, kwargs, "assistant_early_exit") is not None:
        raise ValueError(
            "assistant_early_exit drafts with the model's own first layers, which would share this model's rolling "
            "cache; it is not supported. Pass assistant_model= or prompt_lookup_num_tokens=, or call "
            "hf_rolling_cache.disable(model) for this generation."
        )


def _rollback_slack(model: PreTrainedModel, kwargs: dict) -> int:
    """Ring slack for this call: none, unless it drafts tokens that may be rolled back (assisted or prompt-lookup
    decoding), then room for twice the drafts of a step, at least `_MIN_SLACK`."""
    lookup = _option(model, kwargs, "prompt_lookup_num_tokens")
    assistant = kwargs.get("assistant_model")
    if lookup is None and assistant is None:
        return 0
    drafts = lookup or getattr(assistant.generation_config, "num_assistant_tokens", None) or 20
    return max(_MIN_SLACK, 2 * drafts)
