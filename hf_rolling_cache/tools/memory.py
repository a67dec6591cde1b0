"""Bytes a KV cache holds, measured: the one function the tools and benchmarks report cache memory with.

A rolling cache counts its own storage (`RollingSlidingWindowCache.memory_bytes`). Transformers' caches
(`DynamicCache`, `StaticCache`, ...) are measured by the storages behind their layers' keys and values, each distinct
storage once: a sliding layer of `DynamicCache` shows W-1 tokens sliced from a W-token tensor, and the slice keeps the
whole tensor alive. Predictions from a model's shape, before anything is allocated, are `estimate`'s formulas.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..cache import RollingSlidingWindowCache


def cache_bytes(cache: Cache | None) -> int:
    """Bytes the cache's keys and values hold now: a rolling cache's `memory_bytes`, or for Transformers' caches the
    distinct storages behind their layers' keys and values (views of one storage count it once); 0 for no cache."""
    if cache is None:
        return 0
    if isinstance(cache, RollingSlidingWindowCache):
        return cache.memory_bytes()
    storages = {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):  # a layer not yet written holds none
                storage = tensor.untyped_storage()
                storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
