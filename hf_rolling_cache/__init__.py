"""A true rolling-buffer KV cache and xFormers attention for sliding-window (Mistral-style) Transformers models.

``import hf_rolling_cache`` registers the attention implementation ``"rolling_xformers"``.
"""

from .attention import register as _register
from .cache import ATTENTION_NAME, RollingSlidingWindowCache
from .graphs import release_cuda_graphs, use_cuda_graphs
from .integration import disable, enable, is_enabled

_register()

_TOOLS = {"load_smollm2": "smollm2", "load_gemma3_270m": "gemma3"}  # demo-model loaders, in the tools wing


def __getattr__(name: str):
    """The loaders live in ``hf_rolling_cache.tools``, imported only when asked for."""
    if name in _TOOLS:
        from importlib import import_module

        return getattr(import_module(f".tools.{_TOOLS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTENTION_NAME",
    "RollingSlidingWindowCache",
    "disable",
    "enable",
    "is_enabled",
    "load_gemma3_270m",
    "load_smollm2",
    "release_cuda_graphs",
    "use_cuda_graphs",
]
__version__ = "0.1.0"
