"""The one small random model the tools, benchmarks and tests build: a Mistral config with a sliding window."""

from __future__ import annotations

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
