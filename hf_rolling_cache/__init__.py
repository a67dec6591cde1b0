"""A true rolling-buffer KV cache and xFormers attention for sliding-window (Mistral-style) Transformers models.

``import hf_rolling_cache`` registers the attention implementation ``"rolling_xformers"``.
"""

from .attention import register as _register
from .cache import ATTENTION_NAME, RollingSlidingWindowCache

_register()

__all__ = ["ATTENTION_NAME", "RollingSlidingWindowCache"]
__version__ = "0.1.0"
