"""`hf-rolling-cache` (also `python -m hf_rolling_cache`): size a KV cache, walk through the seed's masks, and
measure what a KV cache buys."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from . import estimate


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        parser.exit(2, f"hf-rolling-cache {args.command}: error: {error}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-rolling-cache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sizing = commands.add_parser("estimate", help="KV-cache bytes, full and rolling; FLOPs a KV cache saves",
                                 description="KV-cache bytes for a full cache and for the rolling cache, and the "
                                 "FLOPs a KV cache saves over a generation (seed 002's formula).")
    source = sizing.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(estimate.PRESETS))
    source.add_argument("--config", metavar="PATH", help="a config.json, or a model folder holding one")
    source.add_argument("--model-config", metavar="NAME_OR_PATH",
                        help="a model's config through Transformers' AutoConfig, from local files only")
    sizing.add_argument("--batch", type=_positive, default=1)
    sizing.add_argument("--seq", type=_positive, default=1024, help="tokens per sequence (prompt + generation)")
    sizing.add_argument("--dtype", default="fp16", choices=sorted(estimate.DTYPE_BYTES))
    sizing.add_argument("--window", type=_positive, help="sliding window (overrides the config's)")
    sizing.add_argument("--tokens", type=_positive, default=10_000, help="generation length for the FLOPs saved")
    sizing.set_defaults(run=_estimate)

    walk = commands.add_parser("walkthrough", help="the seed's prefill/decode walkthrough, step by step",
                               description="Runs the real cache and attention on a tiny model and prints each "
                               "step's phase, seqlens, mask (0/1) and ring slots, as the seed article does.")
    walk.add_argument("--seqlens", type=_seqlens, default=[4, 1, 3], help="prompt lengths, e.g. 4,1,3")
    walk.add_argument("--window", type=_positive, default=3)
    walk.add_argument("--chunk", type=_positive, default=2)
    walk.add_argument("--new", type=_non_negative, default=5, help="tokens to decode")
    walk.add_argument("--png", metavar="FILE", help="also draw the masks and slots, one panel per step")
    walk.set_defaults(run=_walkthrough)

    bench = commands.add_parser("bench", help="no cache vs Transformers' cache vs the rolling cache",
                                description="Decode tokens/s and KV-cache memory over growing generation lengths "
                                "on a small random Mistral (GPU when present).")
    bench.add_argument("--lengths", type=_seqlens, default=[64, 128, 256], help="generation lengths, e.g. 64,128")
    bench.add_argument("--batch", type=_positive, default=1)
    bench.add_argument("--window", type=_positive, default=32)
    bench.add_argument("--prompt", type=_positive, default=16)
    bench.add_argument("--png", metavar="FILE", help="also plot tokens/s and memory against length")
    bench.set_defaults(run=_bench)
    return parser


# --- argument types: argparse turns their ValueError into "invalid ... value" with exit code 2 --------------------

def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _seqlens(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, like 4,1,3; got {text!r}")
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return values


# --- estimate -------------------------------------------------------------------------------------------------------

def _estimate(args) -> int:
    if args.preset:
        shape, name = estimate.PRESETS[args.preset], args.preset
    elif args.config:
        shape, name = estimate.load_config(args.config), args.config
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(args.model_config, local_files_only=True)
        except OSError as error:
            raise ValueError(f"no local config for {args.model_config!r} ({error})") from None
        shape, name = estimate.KVShape.from_config(config.to_dict()), args.model_config
    window = args.window or shape.window
    size = estimate.dtype_bytes(args.dtype)
    print(f"{name}: {shape.layers} layers, {shape.kv_heads} kv heads x head_dim {shape.head_dim} = "
          f"{shape.kv_width} numbers per token for K and for V; {args.dtype} ({size} bytes)")
    full = estimate.kv_cache_bytes(shape, args.batch, args.seq, size)
    print(f"full KV cache, batch {args.batch} x {args.seq} tokens: {estimate.format_bytes(full)}")
    print(f"  = 2 x {size} x {shape.layers} x {shape.kv_width} x {args.seq} x {args.batch} bytes")
    if window is None:
        print("rolling cache: this model has no sliding window; pass --window W to size one")
    else:
        rolling = estimate.rolling_cache_bytes(shape, args.batch, window, size)
        print(f"rolling cache, window {window}: {estimate.format_bytes(rolling)} at any length "
              f"({window} slots per layer and sequence)")
    flops = estimate.flops_saved(args.tokens, shape.kv_heads, shape.hidden, shape.layers)
    print(f"FLOPs a KV cache saves over {args.tokens} tokens: {flops:.4e} = 2 x (T (T-1) / 2) x n_kv_heads x dim^2 x "
          f"layers, with T {args.tokens}, n_kv_heads {shape.kv_heads}, dim {shape.hidden}, layers {shape.layers}")
    return 0


# --- walkthrough ----------------------------------------------------------------------------------------------------

_PHASE_NAMES = {"prefill": "prefill", "subsequent_prefill": "subsequent prefill", "decode": "decode"}


def _walkthrough(args) -> int:
    from .walkthrough import run_walkthrough

    steps, _ = run_walkthrough(args.seqlens, args.window, args.chunk, args.new)
    print(f"seqlens {args.seqlens}, window {args.window}, chunk {args.chunk}, {args.new} new tokens")
    for step in steps:
        print(f"\n{step.name}: {_PHASE_NAMES[step.phase]}")
        print(f"  q_seqlen  = {list(step.q_seqlens)}")
        print(f"  kv_seqlen = {list(step.kv_seqlens)}")
        print(f"  mask ({len(step.mask)} x {len(step.mask[0])}):")
        for row in step.mask:
            print("    [" + ", ".join(str(v) for v in row) + "]")
        for b, slots in enumerate(step.slot_positions):
            shown = ", ".join("-" if p < 0 else str(p) for p in slots)
            print(f"  sequence {b} ring slots: [{shown}]")
    if args.png:
        _draw_walkthrough(steps, args.png)
        print(f"\nwrote {args.png}")
    return 0


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install 'hf-rolling-cache[cli]'") from None
    return plt


def _draw_walkthrough(steps, path: str) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 4.4), squeeze=False)
    for axis, step in zip(axes[0], steps):
        axis.imshow(step.mask, cmap="Greys", vmin=0, vmax=1.4)
        for (r, c), value in _cells(step.mask):
            axis.text(c, r, str(value), ha="center", va="center", color="white" if value else "black", fontsize=8)
        slots = "\n".join(f"seq {b}: " + " ".join("-" if p < 0 else str(p) for p in s)
                          for b, s in enumerate(step.slot_positions))
        axis.set_title(f"{step.name}\n{_PHASE_NAMES[step.phase]}\nq {list(step.q_seqlens)} kv {list(step.kv_seqlens)}",
                       fontsize=8)
        axis.set_xlabel(f"keys\nring slots (positions):\n{slots}", fontsize=7)
        axis.set_ylabel("queries", fontsize=7)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _cells(grid):
    return (((r, c), v) for r, row in enumerate(grid) for c, v in enumerate(row))


# --- bench ----------------------------------------------------------------------------------------------------------

def _bench(args) -> int:
    import torch
    from tqdm import tqdm
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    from .cache import RollingSlidingWindowCache

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, sliding_window=args.window,
                           max_position_embeddings=1 << 16, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = MistralForCausalLM(config).eval().to(device)
    prompt = torch.randint(1, 1000, (args.batch, args.prompt), device=device)
    paths = {
        "no cache": ("eager", None),
        "transformers cache": ("sdpa", lambda: DynamicCache(config=model.config)),
        "rolling cache": ("rolling_xformers", lambda: RollingSlidingWindowCache(config=model.config)),
    }
    rows = []
    print(f"small random Mistral on {device}: 4 layers, 2 kv heads x 32, window {args.window}, batch {args.batch}, "
          f"prompt {args.prompt}")
    for length in tqdm(args.lengths, desc="lengths", file=sys.stderr):
        for name, (implementation, make_cache) in paths.items():
            model.set_attn_implementation(implementation)
            cache = make_cache() if make_cache else None
            start = time.perf_counter()
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length,
                           min_new_tokens=length, do_sample=False, use_cache=cache is not None,
                           past_key_values=cache, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append(dict(length=length, path=name, tokens_per_s=args.batch * length / seconds,
                             cache_bytes=_cache_bytes(cache)))
    print(f"{'new tokens':>10}  {'path':<20} {'tokens/s':>10} {'KV cache':>14}")
    for row in rows:
        print(f"{row['length']:>10}  {row['path']:<20} {row['tokens_per_s']:>10.1f} {row['cache_bytes']:>12,d} B")
    if args.png:
        _plot_bench(rows, args.png)
        print(f"wrote {args.png}")
    return 0


def _cache_bytes(cache) -> int:
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def _plot_bench(rows, path: str) -> None:
    plt = _pyplot()
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in dict.fromkeys(r["path"] for r in rows):
        mine = [r for r in rows if r["path"] == name]
        lengths = [r["length"] for r in mine]
        speed.plot(lengths, [r["tokens_per_s"] for r in mine], marker="o", label=name)
        memory.plot(lengths, [r["cache_bytes"] / 2**20 for r in mine], marker="o", label=name)
    speed.set(xlabel="new tokens", ylabel="tokens/s", title="decode speed")
    memory.set(xlabel="new tokens", ylabel="KV cache (MiB)", title="KV-cache memory")
    speed.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
