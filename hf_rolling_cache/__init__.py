"""A true rolling-buffer KV cache and xFormers attention for sliding-window (Mistral-style) Transformers models.

``import hf_rolling_cache`` registers the attention implementation ``"rolling_xformers"``.
"""

from .attention import register as _register
from .cache import ATTENTION_NAME, RollingSlidingWindowCache
from .graphs import release_cuda_graphs, use_cuda_graphs
from .integration import disable, enable, is_enabled
from .smollm2 import load_smollm2

_register()

__all__ = [
    "ATTENTION_NAME",
    "RollingSlidingWindowCache",
    "disable",
    "enable",
    "is_enabled",
    "load_smollm2",
    "release_cuda_graphs",
    "use_cuda_graphs",
]
__version__ = "0.1.0"
