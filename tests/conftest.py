"""Shared builders: tiny Mistral pairs (eager reference, rolling) with the same weights, and ragged batches."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import hf_rolling_cache  # noqa: F401  (registers "rolling_xformers")
from hf_rolling_cache.tools.models import tiny_mistral_config


def tiny_config(window: int, *, kv_heads: int = 2, heads: int = 4, head_dim: int = 16, layers: int = 2, vocab: int = 97):
    """The tools' small Mistral config (hidden 64), with the sizes the tests vary."""
    return tiny_mistral_config(window, kv_heads=kv_heads, heads=heads, head_dim=head_dim, layers=layers, vocab=vocab)


def model_pair(config: MistralConfig, seed: int = 0) -> tuple[MistralForCausalLM, MistralForCausalLM]:
    """The same random weights twice: Transformers' eager attention (the reference) and rolling_xformers.

    Each model gets its own config object: a model keeps the config it is built from, and the attention
    implementation lives there.
    """
    torch.manual_seed(seed)
    reference = MistralForCausalLM(copy.deepcopy(config)).eval()
    reference.set_attn_implementation("eager")
    rolling = MistralForCausalLM(copy.deepcopy(config)).eval()
    rolling.load_state_dict(reference.state_dict())
    rolling.set_attn_implementation("rolling_xformers")
    return reference, rolling


def ragged_batch(lengths: list[int], vocab: int = 97, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for prompts of ``lengths`` random tokens (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(1, vocab, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def word_tokenizer(vocab_size=97):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]",
                                   padding_side="left")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
