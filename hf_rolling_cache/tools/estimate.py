"""KV-cache sizing and the compute a KV cache saves, as "KV Caching in Mistral with Transformers and xFormers" and
"【笔记】KV-cache" compute them.

Per layer and token a cache holds a key and a value of ``n_kv_heads x head_dim`` numbers (grouped-query attention
stores fewer heads than it queries; for multi-head models this is d_model). A full cache holds every token; the
rolling cache holds exactly ``window`` slots per sequence in each sliding layer, allocated at first use, and every
token in a hybrid model's global (full-attention) layers: flat for the former, growing for the latter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class KVShape:
    """What sizes a KV cache: layers, kv heads x head_dim per token, and the sliding window (None: full attention)."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int  # d_model, the "dim" of the article's FLOPs formula
    window: int | None = None
    sliding_layers: int | None = None  # layers that slide over the window (None: all of them, when there is one)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def rings(self) -> int:
        """Layers that keep a ring of ``window`` slots; the others keep every token."""
        if self.window is None:
            return 0
        return self.layers if self.sliding_layers is None else self.sliding_layers

    @classmethod
    def from_config(cls, config: Mapping | object) -> KVShape:
        """From a config.json's fields (Mistral, Llama, OPT, ... names) or a Transformers config object, whose
        attribute aliases (GPT-2's ``n_layer`` ...) then apply."""
        field = config.get if isinstance(config, Mapping) else lambda name: getattr(config, name, None)
        layers, heads, hidden = (field(name) for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
        if None in (layers, heads, hidden):
            raise ValueError("The config needs num_hidden_layers, num_attention_heads and hidden_size: is it a "
                             "decoder model's config.json? For other field names (GPT-2's n_layer ...), pass the model "
                             "folder to --model-config.")
        kv_heads = field("num_key_value_heads") or heads
        head_dim = field("head_dim") or hidden // heads
        window, sliding_layers = _window(field)
        return cls(layers, kv_heads, head_dim, hidden, window=window, sliding_layers=sliding_layers)


def _window(field) -> tuple[int | None, int | None]:
    """The sliding window and how many layers slide over it (None: all). Some configs (Qwen2) keep a
    ``sliding_window`` value while ``use_sliding_window`` is false; hybrids list their layers' kinds
    (``layer_types``): only the ``sliding_attention`` ones keep a ring."""
    window = field("sliding_window") or None
    if field("use_sliding_window") is False or window is None:
        return None, None
    layer_types = field("layer_types")
    if layer_types is None:
        return window, None
    sliding = sum(kind == "sliding_attention" for kind in layer_types)
    return (window, sliding) if sliding else (None, None)


PRESETS = {
    "mistral-7b": KVShape(layers=32, kv_heads=8, head_dim=128, hidden=4096, window=4096),
    # Gemma 3 12B: 48 layers, 5 sliding (window 1024) to 1 global, 8 kv heads of 256
    "gemma3-12b": KVShape(layers=48, kv_heads=8, head_dim=256, hidden=3840, window=1024, sliding_layers=40),
    # OPT-30B, the example of "【笔记】KV-cache": 48 layers, d_model 7168 (56 heads of 128), full attention
    "opt-30b": KVShape(layers=48, kv_heads=56, head_dim=128, hidden=7168, window=None),
}


def load_config(path: str | Path) -> KVShape:
    """A config.json, or a folder holding one (local files only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"No config.json at {path}: give a config.json file or a model folder that holds one.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): give a model's config.json.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no JSON object: give a model's config.json.")
    return KVShape.from_config(config)


def kv_cache_bytes(shape: KVShape, batch: int, tokens: int, dtype_bytes: int) -> int:
    """2 (K and V) x bytes x layers x (n_kv_heads x head_dim) x tokens x batch."""
    return 2 * dtype_bytes * shape.layers * shape.kv_width * tokens * batch


SCALE_BYTES = {"fp8": 4}  # the 8-bit ring's float16 (scale, shift) pair per token and kv head (`_fp8`)


def rolling_cache_bytes(
    shape: KVShape, batch: int, window: int, dtype_bytes: int, tokens: int = 0, scale_bytes: int = 0
) -> int:
    """The rolling cache: exactly ``window`` slots per sliding layer and sequence whatever the length, and
    ``tokens`` per global layer (a hybrid model's full-attention layers keep every token). ``scale_bytes``: what
    a slot keeps per kv head beside its numbers, for K and for V (the 8-bit ring's scale pair)."""
    rings = shape.rings if shape.window is not None else shape.layers  # --window on a model without one: all slide
    per_token = 2 * (dtype_bytes * shape.kv_width + scale_bytes * shape.kv_heads) * batch
    return per_token * (rings * window + (shape.layers - rings) * tokens)


A100_FLOPS = 312e12  # the article's figure for one A100, to turn FLOPs saved into time


def flops_saved(tokens: int, kv_heads: int, dim: int, layers: int) -> int:
    """The simplified count of "KV Caching in Mistral with Transformers and xFormers", kept as
    the article states it: decoding step t saves 2 (t-1) n_kv_heads dim^2
    FLOPs per layer (recomputing the t-1 earlier tokens' keys and values); over T tokens, 2 (T (T-1) / 2)
    n_kv_heads dim^2 per layer."""
    return tokens * (tokens - 1) * kv_heads * dim * dim * layers


def format_bytes(count: int) -> str:
    return f"{count / 1e9:,.2f} GB ({count / 2**30:,.2f} GiB)"


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_BYTES)}") from None
