"""Replay the walkthrough of "KV Caching in Mistral with Transformers and xFormers" on a real model: prefill each sequence in chunks of its own, then decode.

The article (seqlens [4, 1, 3], window 3, chunk 2) takes the first ``chunk`` tokens of every sequence, then the next,
and so on, packing whatever each sequence has left; `generate` instead cuts the left-padded batch into columns.
Both run the same cache and attention code; this module drives the article's order and records every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import MistralForCausalLM

from ..cache import ATTENTION_NAME, RollingSlidingWindowCache
from .models import tiny_mistral_config


@dataclass(frozen=True)
class WalkthroughStep:
    """One forward of the walkthrough, as the article describes it."""

    name: str  # "iteration 1", ..., "decode 1", ...
    phase: str  # prefill, subsequent_prefill or decode
    q_seqlens: tuple[int, ...]
    kv_seqlens: tuple[int, ...]
    mask: list[list[int]]  # the materialized mask as 0/1, [packed queries x keys]
    slot_positions: list[list[int]]  # per sequence, the position held by each ring slot (-1: empty)
    tokens: list[list[int]]  # per sequence, every token fed so far (prompt, then generated)


def tiny_model(window: int, *, seed: int = 0, vocab_size: int = 128, layers: int = 2) -> MistralForCausalLM:
    """A small random Mistral (fp32, CPU) using the rolling attention."""
    torch.manual_seed(seed)
    model = MistralForCausalLM(tiny_mistral_config(window, vocab=vocab_size, layers=layers)).eval()
    model.set_attn_implementation(ATTENTION_NAME)
    return model


@torch.no_grad()
def run_walkthrough(
    seqlens: Sequence[int],
    window: int,
    chunk: int,
    new_tokens: int,
    *,
    model: MistralForCausalLM | None = None,
    seed: int = 0,
) -> tuple[list[WalkthroughStep], RollingSlidingWindowCache]:
    """Prefill prompts of ``seqlens`` tokens ``chunk`` at a time per sequence, then greedily decode ``new_tokens``."""
    if not seqlens or any(n <= 0 for n in seqlens):
        raise ValueError(f"seqlens must be positive prompt lengths, got {list(seqlens)}.")
    if window <= 0 or chunk <= 0 or new_tokens < 0:
        raise ValueError("window and chunk must be positive and new_tokens non-negative.")
    if model is None:
        model = tiny_model(window, seed=seed)
    if model.config.sliding_window != window:
        raise ValueError(f"The model's sliding_window is {model.config.sliding_window}, not {window}.")
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in seqlens]
    tokens = [[] for _ in seqlens]
    cache = RollingSlidingWindowCache(config=model.config)
    cache.ledger.allow_holes = True  # per-sequence chunks: a sequence may bring no token to a later forward
    history = torch.zeros(len(seqlens), 0, dtype=torch.long)
    last_logits = [None] * len(seqlens)
    steps = []

    def forward(pieces: list[list[int]], name: str) -> None:
        nonlocal history
        width = max(len(p) for p in pieces)
        input_ids = torch.zeros(len(pieces), width, dtype=torch.long)
        chunk_mask = torch.zeros_like(input_ids)
        positions = torch.zeros_like(input_ids)
        for b, piece in enumerate(pieces):
            if piece:
                input_ids[b, width - len(piece) :] = torch.tensor(piece)
                chunk_mask[b, width - len(piece) :] = 1
                positions[b, width - len(piece) :] = torch.arange(len(tokens[b]), len(tokens[b]) + len(piece))
        history = torch.cat([history, chunk_mask], dim=1)
        logits = model(
            input_ids=input_ids, attention_mask=history, position_ids=positions, past_key_values=cache
        ).logits
        for b, piece in enumerate(pieces):
            tokens[b] += piece
            if piece:
                last_logits[b] = logits[b, -1]
        plan = cache.last_plan
        mask = plan.mask().materialize((plan.num_queries, plan.num_keys)).exp().round().to(torch.int64)
        steps.append(
            WalkthroughStep(
                name=name,
                phase=plan.phase.value,
                q_seqlens=plan.q_seqlens,
                kv_seqlens=plan.kv_seqlens,
                mask=mask.tolist(),
                slot_positions=cache.slot_positions(),
                tokens=[list(t) for t in tokens],
            )
        )

    iteration = 0
    while any(len(t) < len(p) for t, p in zip(tokens, prompts)):
        iteration += 1
        forward([p[len(t) : len(t) + chunk] for t, p in zip(tokens, prompts)], f"iteration {iteration}")
    for step in range(1, new_tokens + 1):
        forward([[int(logits.argmax())] for logits in last_logits], f"decode {step}")
    return steps, cache
