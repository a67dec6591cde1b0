"""`hf-rolling-cache` (also `python -m hf_rolling_cache`): size a KV cache, walk through the article's masks, and
measure what a KV cache buys."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from . import estimate


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no subcommand: the whole help, not a one-line usage error
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ValueError as error:
        parser.exit(2, f"hf-rolling-cache {args.command}: error: {error}\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="hf-rolling-cache", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")

    sizing = commands.add_parser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, name="estimate", help="KV-cache bytes, full and rolling; FLOPs a KV cache saves",
                                 description="KV-cache bytes for a full cache and for the rolling cache, and the "
                                 "FLOPs a KV cache saves over a generation (the simplified count of 'KV Caching "
                                 "in Mistral with Transformers and xFormers').")
    source = sizing.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(estimate.PRESETS))
    source.add_argument("--config", metavar="PATH", help="a config.json, or a model folder holding one")
    source.add_argument("--model-config", metavar="NAME_OR_PATH",
                        help="a model's config through Transformers' AutoConfig, from local files only")
    sizing.add_argument("--batch", type=_positive, default=1, help="sequences held together")
    sizing.add_argument("--seq", type=_positive, default=1024, help="tokens per sequence (prompt + generation)")
    sizing.add_argument("--dtype", default="fp16", choices=sorted(estimate.DTYPE_BYTES), help="element type of K and V")
    sizing.add_argument("--window", type=_positive, help="sliding window (overrides the config's)")
    sizing.add_argument("--tokens", type=_positive, default=10_000, help="generation length for the FLOPs saved")
    sizing.set_defaults(run=_estimate)

    walk = commands.add_parser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, name="walkthrough", help="the prefill/decode walkthrough of 'KV Caching in Mistral with "
                               "Transformers and xFormers', step by step",
                               description="Runs the real cache and attention on a tiny model and prints each "
                               "step's phase, seqlens, mask (0/1) and ring slots, as the article does.")
    walk.add_argument("--seqlens", type=_seqlens, default=[4, 1, 3], help="prompt lengths, e.g. 4,1,3")
    walk.add_argument("--window", type=_positive, default=3, help="sliding window W")
    walk.add_argument("--chunk", type=_positive, default=2, help="prefill chunk per sequence")
    walk.add_argument("--new", type=_non_negative, default=5, help="tokens to decode")
    walk.add_argument("--png", metavar="FILE", help="also draw the masks and slots, one panel per step")
    walk.set_defaults(run=_walkthrough)

    bench = commands.add_parser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, name="bench", help="no cache vs Transformers' cache vs the rolling cache",
                                description="Tokens/s and KV-cache memory over growing generation lengths on a "
                                "small random Mistral (GPU when present): no cache, Transformers' cache, the rolling "
                                "cache.")
    bench.add_argument("--lengths", type=_seqlens, default=[64, 128, 256], help="generation lengths, e.g. 64,128")
    bench.add_argument("--batch", type=_positive, default=1, help="sequences generated together")
    bench.add_argument("--window", type=_positive, default=32, help="the small model's sliding window")
    bench.add_argument("--prompt", type=_positive, default=16, help="prompt tokens per sequence")
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
        shape, name = estimate.KVShape.from_config(_local_model_config(args.model_config)), args.model_config
    window = args.window or shape.window
    size = estimate.dtype_bytes(args.dtype)
    scales = estimate.SCALE_BYTES.get(args.dtype, 0)
    print(f"{name}: {shape.layers} layers, {shape.kv_heads} kv heads x head_dim {shape.head_dim} = "
          f"{shape.kv_width} numbers per token for K and for V; {args.dtype} ({size} bytes)")
    print("units: GB = 10^9 bytes, GiB = 2^30 bytes")
    full = estimate.kv_cache_bytes(shape, args.batch, args.seq, size)
    print(f"full KV cache, batch {args.batch} x {args.seq} tokens: {estimate.format_bytes(full)}")
    print(f"  = 2 x {size} x {shape.layers} x {shape.kv_width} x {args.seq} x {args.batch} bytes")
    if window is None:
        print("rolling cache: the config gives no sliding window; pass --window W to size one")
    elif shape.window is not None and shape.rings < shape.layers:  # a hybrid model
        rolling = estimate.rolling_cache_bytes(shape, args.batch, window, size, args.seq, scales)
        rings = estimate.rolling_cache_bytes(shape, args.batch, window, size, 0, scales)
        print(f"rolling cache, window {window}: {estimate.format_bytes(rolling)} at {args.seq} tokens")
        print(f"  {shape.rings} sliding layers x {window} slots: {estimate.format_bytes(rings)} at any length; "
              f"{shape.layers - shape.rings} global layers x {args.seq} tokens: {estimate.format_bytes(rolling - rings)}"
              " (they keep every token and grow with the length)")
    else:
        rolling = estimate.rolling_cache_bytes(shape, args.batch, window, size, scale_bytes=scales)
        print(f"rolling cache, window {window}: {estimate.format_bytes(rolling)} at any length "
              f"({window} slots per layer and sequence)")
        if shape.window is None:
            print(f"  note: the model attends to every token; with a {window}-token window it computes something else")
        if args.seq < window:
            print(f"  note: more than the full cache at {args.seq} tokens: the ring allocates all {window} slots at "
                  "the first token")
    if window is not None and scales:
        print(f"  the 8-bit ring (kv_dtype=torch.float8_e4m3fn) keeps {scales} more bytes per slot and kv head for K and "
              f"for V (a float16 scale and shift): {shape.head_dim + scales} bytes per {shape.head_dim} numbers")
    flops = estimate.flops_saved(args.tokens, shape.kv_heads, shape.hidden, shape.layers)
    print(f"FLOPs a KV cache saves over {args.tokens} tokens (the article's simplified count): {flops:.4e}")
    print(f"  = 2 x (T (T-1) / 2) x n_kv_heads x dim^2 x layers, with T {args.tokens}, n_kv_heads {shape.kv_heads}, "
          f"dim {shape.hidden}, layers {shape.layers}")
    print(f"  about {flops / estimate.A100_FLOPS / 60:,.1f} minutes of an A100 at {estimate.A100_FLOPS:.3g} FLOP/s "
          "(the article's comparison)")
    return 0


def _local_model_config(name: str):
    """A model's config through Transformers' AutoConfig, from a folder or the local Hugging Face cache only."""
    from transformers import AutoConfig

    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ValueError(f"{name} holds no config.json: give the folder a model was saved to")
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        if Path(name).is_dir():  # the config.json is there: what is wrong is inside it
            raise ValueError(f"cannot read {Path(name) / 'config.json'} ({error})") from None
        raise ValueError(f"no local config for {name!r}: --model-config reads local files only (no download); "
                         "give a model folder holding config.json, or a model id already in the Hugging Face cache"
                         ) from None


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

    from .bench import run_bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"small random Mistral on {device}: hidden 256, 4 layers, 2 kv heads x 32, window {args.window}, "
          f"batch {args.batch}, prompt {args.prompt}, fp32")
    rows = run_bench(args.lengths, args.batch, args.window, args.prompt, device)
    gpu = device == "cuda"
    print(f"{'new tokens':>10}  {'path':<20} {'new tok/s':>10} {'KV cache held':>15}"
          + (f" {'peak GPU':>15}" if gpu else "") + "  same tokens as no cache")
    for row in rows:
        print(f"{row.new_tokens:>10}  {row.path:<20} {row.tokens_per_s:>10.1f} {row.cache_bytes:>13,d} B"
              + (f" {row.peak_gpu_bytes:>13,d} B" if gpu else "") + f"  {'yes' if row.matches_no_cache else 'NO'}")
    shape = estimate.KVShape(layers=4, kv_heads=2, head_dim=32, hidden=256)
    full = {n: estimate.kv_cache_bytes(shape, args.batch, args.prompt + n - 1, 4) for n in args.lengths}
    print("a full cache (no window) would hold: " + ", ".join(f"{b:,d} B at {n}" for n, b in full.items())
          + " new tokens (prompt + new - 1 tokens, computed)")
    print("tokens/s: new tokens x batch over the whole generate call, prompt included")
    if args.png:
        _plot_bench(rows, full, args.png)
        print(f"wrote {args.png}")
    return 0


def _plot_bench(rows, full: dict[int, int], path: str) -> None:
    plt = _pyplot()
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, marker in zip(dict.fromkeys(r.path for r in rows), "osx"):
        mine = [r for r in rows if r.path == name]
        lengths = [r.new_tokens for r in mine]
        speed.plot(lengths, [r.tokens_per_s for r in mine], marker=marker, label=name)
        memory.plot(lengths, [r.cache_bytes / 2**10 for r in mine], marker=marker, label=name)
    memory.plot(list(full), [b / 2**10 for b in full.values()], "k--", label="full cache, computed")
    memory.legend(fontsize=8)
    speed.set(xlabel="new tokens", ylabel="new tokens/s", title="generation speed")
    memory.set(xlabel="new tokens", ylabel="KV cache held (KiB)", title="KV-cache memory")
    speed.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
