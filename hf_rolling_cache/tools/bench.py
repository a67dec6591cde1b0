"""The articles' exercise, "implement a KV cache and test the speed-up": one small random Mistral generating with no cache,
with Transformers' cache and with the rolling cache, timed, with the KV-cache bytes each holds at the end.

All three paths share the model, the prompt and the attention kernel family ("sdpa" for the first two), so the
time differences come from caching. Memory is `memory.cache_bytes`: the storage the cache's tensors keep alive, not
their visible shape (Transformers' sliding layer shows W-1 tokens but keeps the W-token tensor it sliced them from).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from ..cache import RollingSlidingWindowCache
from .memory import cache_bytes
from .models import tiny_mistral_config

VOCAB = 1000


@dataclass(frozen=True)
class BenchRow:
    new_tokens: int
    path: str
    tokens_per_s: float  # new tokens x batch / seconds of the whole generate call (prompt included)
    cache_bytes: int  # storage held by the cache after generation
    peak_gpu_bytes: int | None  # torch.cuda.max_memory_allocated during the call; None on CPU
    matches_no_cache: bool  # same greedy tokens as the no-cache path


def bench_config(window: int) -> MistralConfig:
    """The small model: hidden 256, 4 layers, 8 query heads sharing 2 kv heads of 32."""
    return tiny_mistral_config(window, hidden=256, layers=4, heads=8, kv_heads=2, vocab=VOCAB, max_positions=1 << 16)


def run_bench(lengths: list[int], batch: int, window: int, prompt_length: int, device: str) -> list[BenchRow]:
    """Each length on each path, after one short warm-up generation per path; a progress bar on stderr."""
    torch.manual_seed(0)
    model = MistralForCausalLM(bench_config(window)).eval().to(device)
    prompt = torch.randint(1, VOCAB, (batch, prompt_length), device=device)
    paths = {
        "no cache": ("sdpa", None),
        "transformers cache": ("sdpa", lambda: DynamicCache(config=model.config)),
        "rolling cache": ("rolling_xformers", lambda: RollingSlidingWindowCache(config=model.config)),
    }
    for implementation, make_cache in paths.values():
        model.set_attn_implementation(implementation)
        _generate(model, prompt, 2, make_cache() if make_cache else None)

    rows = []
    progress = tqdm(total=len(lengths) * len(paths), desc="bench", file=sys.stderr)
    for length in lengths:
        reference = None
        for name, (implementation, make_cache) in paths.items():
            model.set_attn_implementation(implementation)
            cache = make_cache() if make_cache else None
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            tokens = _generate(model, prompt, length, cache)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            reference = tokens if reference is None else reference
            rows.append(BenchRow(
                new_tokens=length, path=name, tokens_per_s=batch * length / seconds, cache_bytes=cache_bytes(cache),
                peak_gpu_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None,
                matches_no_cache=torch.equal(tokens, reference)))
            progress.update()
    progress.close()
    return rows


def _generate(model, prompt: torch.Tensor, length: int, cache) -> torch.Tensor:
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length,
                          min_new_tokens=length, do_sample=False, use_cache=cache is not None, past_key_values=cache,
                          pad_token_id=0)

