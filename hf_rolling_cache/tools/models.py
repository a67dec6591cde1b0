"""The one small random model the tools, benchmarks and tests build (a Mistral config with a sliding window), and
the one ragged batch of random prompts they feed such models."""

from __future__ import annotations

import torch
from transformers import MistralConfig


def tiny_mistral_config(
    window: int,
    *,
    hidden: int = 64,
    intermediate: int | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 97,
    max_positions: int = 4096,
) -> MistralConfig:
    """A small Mistral config (intermediate size 2 x hidden, head_dim hidden / heads unless given), pad id 0 and no
    BOS/EOS, so generations never stop early."""
    return MistralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        sliding_window=window,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


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
