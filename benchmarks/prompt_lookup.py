"""Prompt-lookup decoding with the rolling cache on the packaged SmolLM2 (CPU or GPU): the speed-up on a text that
repeats itself, and the tokens against plain greedy decoding and against Transformers' own prompt lookup.

    python benchmarks/prompt_lookup.py [--window 256] [--new 200] [--drafts 10]

Prompt lookup drafts the next tokens from an earlier occurrence of the last few in the prompt; the model verifies
the drafts in one forward and the cache rolls back the rejected ones (a ring with slack keeps that exact).
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_rolling_cache
from hf_rolling_cache.tools.smollm2 import load_smollm2

TEXT = (
    "def rolling_slot(position, window):\n    return position % window\n\n"
    "def unrotated(seen, window):\n    first = seen - min(seen, window)\n"
    "    return [rolling_slot(p, window) for p in range(first, seen)]\n\n"
)


def timed(model, inputs, **options):
    start = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, **options)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=256, help="sliding window W")
    parser.add_argument("--new", type=int, default=200, help="new tokens")
    parser.add_argument("--drafts", type=int, default=10, help="prompt_lookup_num_tokens")
    args = parser.parse_args()
    model, tokenizer = load_smollm2(window=args.window)
    prompt = "Rewrite this code exactly, twice:\n\n" + TEXT + "\nOnce:\n\n" + TEXT + "\nTwice:\n\n"
    inputs = tokenizer(prompt, return_tensors="pt")
    options = dict(max_new_tokens=args.new, min_new_tokens=args.new)
    model.set_attn_implementation("eager")
    reference, _ = timed(model, inputs, **options)
    reference_lookup, transformers_lookup_s = timed(model, inputs, prompt_lookup_num_tokens=args.drafts, **options)
    hf_rolling_cache.enable(model)
    timed(model, inputs, max_new_tokens=4)  # warm-up
    plain, plain_s = timed(model, inputs, **options)
    lookup, lookup_s = timed(model, inputs, prompt_lookup_num_tokens=args.drafts, **options)
    print(f"SmolLM2-135M, window {args.window}, prompt {inputs['input_ids'].shape[1]} tokens, {args.new} new, "
          f"{args.drafts} drafts; torch threads {torch.get_num_threads()}")
    print(f"rolling cache, greedy:              {plain_s:6.2f} s ({args.new / plain_s:6.1f} tok/s)")
    print(f"rolling cache, prompt lookup:       {lookup_s:6.2f} s ({args.new / lookup_s:6.1f} tok/s), "
          f"speed-up x{plain_s / lookup_s:.2f}")
    print(f"Transformers (eager), prompt lookup: {transformers_lookup_s:6.2f} s")
    print(f"same tokens: rolling lookup = rolling greedy: {torch.equal(lookup, plain)}; "
          f"= Transformers' greedy: {torch.equal(plain, reference)}; "
          f"= Transformers' prompt lookup: {torch.equal(lookup, reference_lookup)}")


if __name__ == "__main__":
    main()
