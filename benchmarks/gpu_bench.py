"""Rolling cache + attention against Transformers' own caches: decode speed, prefill time and memory.

    python benchmarks/gpu_bench.py decode  --batch 1 8 --prompt 6000 --new 128
    python benchmarks/gpu_bench.py prefill --batch 1 --prompt 32768 [--repeat 5]
    python benchmarks/gpu_bench.py sweep   --new 16384 --every 1024 [--compile]
    python benchmarks/gpu_bench.py grid    --batch 1 8 32 --prompt 2048 8192 32768
    python benchmarks/gpu_bench.py decode --tiny      # a small random model, runs on CPU in seconds
    python benchmarks/gpu_bench.py decode --shape gemma3-12b --batch 1 8 --prompt 6000   # a hybrid model

Mistral-7B shape (`MistralConfig()` defaults, sliding_window 4096) by default, or Gemma-3-12B shape (hybrid: 48
layers, 5 sliding with window 1024 to 1 global, 16/8 heads of 256, vocab 262208), with random bf16 weights, prompts
of random tokens, greedy. Prints a table and writes JSON (``--json``). Decode tokens/s are measured between the tokens of one
generation, after its first decode step (a CUDA graph's capture); compilation is a reported warm-up. On a GPU each
decode row also prints its floor: the rate if every step only read every weight and the whole cache once, at the
copy bandwidth measured at the start of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
)

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache, _all_reduce, _kernels
from hf_rolling_cache._cudnn import _cudnn
from hf_rolling_cache.tools.memory import cache_bytes
from hf_rolling_cache.tools.models import tiny_mistral_config

def rolling_cache(model, max_length):
    # a hybrid model's global layers sized for the whole generation, as enable() does (no growth mid-measurement)
    return RollingSlidingWindowCache(config=model.config, max_length=max_length)


def rolling_cache_fp8(model, max_length):
    # the opt-in 8-bit ring: e4m3 codes with a float16 scale per token and kv head
    return RollingSlidingWindowCache(config=model.config, max_length=max_length, kv_dtype=torch.float8_e4m3fn)


def dynamic_cache(model, max_length):
    return DynamicCache(config=model.config)


PATHS = {
    # name: (attention implementation, cache factory(model, max_length), prefill chunk)
    "rolling": ("rolling_xformers", rolling_cache, "window"),
    "rolling_graphs": ("rolling_xformers", rolling_cache, "window"),
    "rolling_graphs_compiled": ("rolling_xformers", rolling_cache, "window"),
    "rolling_graphs_compiled_fp8": ("rolling_xformers", rolling_cache_fp8, "window"),
    # compiled, prefill too (use_cuda_graphs(compile_prefill=True): compiled layers, attention by cuDNN where
    # cudnn-frontend is installed, else FlexAttention); _flex: by FlexAttention either way (cuDNN's baseline)
    "rolling_graphs_compiled_prefill": ("rolling_xformers", rolling_cache, "window"),
    "rolling_graphs_compiled_prefill_flex": ("rolling_xformers", rolling_cache, "window"),
    # compiled prefill, its last layer computing every row (as before `_kept_rows`): the baseline of that saving
    "rolling_graphs_compiled_prefill_allrows": ("rolling_xformers", rolling_cache, "window"),
    # every prefill chunk through every layer (as before `_reach`): the baselines of that saving, compiled and eager
    "rolling_graphs_compiled_prefill_alllayers": ("rolling_xformers", rolling_cache, "window"),
    "rolling_graphs_alllayers": ("rolling_xformers", rolling_cache, "window"),
    # compiled, but each q/k/v and gate/up product separate (as before `_fused`): the fusion's baseline
    "rolling_graphs_compiled_unfused": ("rolling_xformers", rolling_cache, "window"),
    # compiled, decode attention by SDPA after a separate ring write (as before `_ring_decode`): the kernels' baseline
    "rolling_graphs_compiled_sdpa": ("rolling_xformers", rolling_cache, "window"),
    # compiled, every product by cuBLAS (as before `_narrow_products`): the product kernel's baseline
    "rolling_graphs_compiled_cublas": ("rolling_xformers", rolling_cache, "window"),
    # compiled, our kernels launched without programmatic dependent launch (its baseline)
    "rolling_graphs_compiled_nopdl": ("rolling_xformers", rolling_cache, "window"),
    # compiled, inductor's kernels launched as programmatic dependent launches too (off by default: `_compiled`)
    "rolling_graphs_compiled_inductorpdl": ("rolling_xformers", rolling_cache, "window"),
    # compiled, the MLP's activation a kernel of inductor's after the gate/up product (as before `gated_swap`)
    "rolling_graphs_compiled_ungated": ("rolling_xformers", rolling_cache, "window"),
    # compiled, neither the activation nor the residual add in the products' kernels (as before either)
    "rolling_graphs_compiled_unfolded": ("rolling_xformers", rolling_cache, "window"),
    # tensor parallel: the captured step keeps NCCL's all-reduces instead of the one-shot kernel (a baseline)
    "rolling_graphs_compiled_nccl": ("rolling_xformers", rolling_cache, "window"),
    # tensor parallel: every row-parallel sum by PyTorch's one-shot kernel, none pushed (as before `_pushed_sums`)
    "rolling_graphs_compiled_unpushed": ("rolling_xformers", rolling_cache, "window"),
    # tensor parallel: the shards' products by Transformers' forwards (cuBLAS, unfused), as before `_tp_products`
    "rolling_graphs_compiled_unsharded": ("rolling_xformers", rolling_cache, "window"),
    "hf_dynamic_sdpa": ("sdpa", dynamic_cache, None),
    "hf_dynamic_sdpa_chunk": ("sdpa", dynamic_cache, "window"),
    # models whose scores Transformers' sdpa cannot cap or sink (Gemma 2, GPT-OSS): its eager attention
    "hf_dynamic_eager": ("eager", dynamic_cache, None),
    "hf_dynamic_eager_chunk": ("eager", dynamic_cache, "window"),
}


@dataclass
class Result:
    path: str
    batch: int
    prompt: int
    new_tokens: int
    ttft_s: float | None = None  # the median of ttft_runs_s where --repeat asked for several
    ttft_runs_s: list[float] | None = None
    decode_tok_s: float | None = None
    peak_above_weights_gib: float | None = None
    resident_above_weights_gib: float | None = None  # allocated before the run (workspaces, graphs of earlier rows)
    kv_cache_gib: float | None = None
    warmup_s: float | None = None  # graph paths: the first decode graph's warm-up (+ compilation) at this batch
    # decode: the rate if a step only read every weight and every ring slot once at this run's copy bandwidth
    floor_tok_s: float | None = None
    error: str | None = None


def gemma3_12b_config() -> Gemma3TextConfig:
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 8
    return Gemma3TextConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=1024, layer_types=layer_types)


def gpt_oss_20b_config() -> GptOssConfig:
    """GPT-OSS-20B's shape: 24 layers alternating sliding (W=128) and global, attention sinks, 32 experts top-4."""
    return GptOssConfig(num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                        vocab_size=201088, sliding_window=128)


def gemma2_9b_config() -> Gemma2Config:
    """Gemma-2-9B's shape: 42 layers alternating sliding (W=4096) and global, attention score softcap 50."""
    return Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


SHAPES = {"gemma3-12b": (gemma3_12b_config, Gemma3ForCausalLM), "gpt-oss-20b": (gpt_oss_20b_config, GptOssForCausalLM),
          "gemma2-9b": (gemma2_9b_config, Gemma2ForCausalLM)}


def build_model(tiny: bool, device: str, shape: str = "mistral-7b"):
    model_class = MistralForCausalLM
    if tiny:
        config = tiny_mistral_config(64, hidden=128, layers=2, heads=4, kv_heads=2, vocab=1000)
        dtype = torch.float32
    elif shape in SHAPES:
        make_config, model_class = SHAPES[shape]
        config, dtype = make_config(), torch.bfloat16
    else:
        config = MistralConfig()  # Mistral-7B: 32 layers, 32 heads, 8 kv heads, window 4096
        dtype = torch.bfloat16
    config.max_position_embeddings = 1 << 20
    config.bos_token_id = config.eos_token_id = None
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = model_class(config).eval()
        finally:
            torch.set_default_dtype(previous)
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepClock(StoppingCriteria):
    """Stamps the time generate checks each token; never stops the generation. It does not wait for the GPU (a
    sync here would stall the loop that generate keeps a step ahead): the host runs at most one step ahead, so
    over a hundred steps the rate is the GPU's within a percent."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def steady_tokens_per_s(self, batch: int, skip: int = 2) -> float:
        """Tokens/s between later tokens: the prefill's token and the first decode step (where a CUDA graph is
        captured) are left out."""
        intervals = len(self.times) - 1 - skip
        return batch * intervals / (self.times[-1] - self.times[skip])


def run_generate(model, path, input_ids, new_tokens, device, clock: StepClock | None = None):
    implementation, make_cache, chunk = PATHS[path]
    model.set_attn_implementation(implementation)
    compile_prefill = "_compiled_prefill" in path
    _cudnn.enabled = not path.endswith("_prefill_flex")
    if compile_prefill and getattr(model, "_bench_path", None) == path:
        pass  # on as before: a user's process turns it on once (again would compile the prefill again)
    elif path.startswith("rolling_graphs") and device.startswith("cuda"):
        # decode steps replay one captured CUDA graph per cache (compiled: with torch.compile-fused layers)
        hf_rolling_cache.release_cuda_graphs(model)
        if getattr(model, "_bench_path", None) != path:
            # Each path compiles afresh: equal compile options would otherwise let a path reuse the code of another
            # whose variant (a patched pass) differed at trace time.
            torch._dynamo.reset()
        compile = path.startswith("rolling_graphs_compiled")
        with contextlib.ExitStack() as built:
            if path.endswith("_unfused"):
                built.enter_context(mock.patch("hf_rolling_cache._compiled.fuse_groups", lambda *args: []))
            if path.endswith("_unsharded"):
                built.enter_context(mock.patch("hf_rolling_cache._fused.shard_of", lambda module: None))
            if path.endswith("_inductorpdl"):
                built.enter_context(mock.patch("hf_rolling_cache._compiled.INDUCTOR_DEPENDENT_LAUNCH", True))
            hf_rolling_cache.use_cuda_graphs(model, compile=compile, compile_prefill=compile_prefill)
        model._bench_path = path
    else:
        hf_rolling_cache.release_cuda_graphs(model)
        model._bench_path = None
    cache = make_cache(model, input_ids.shape[1] + new_tokens)
    chunk_size = model.config.sliding_window if chunk == "window" else None
    sync(device)
    start = time.perf_counter()
    with contextlib.ExitStack() as options:
        if path.endswith("_nccl"):
            options.enter_context(_all_reduce.nccl_only())
        if path.endswith("_sdpa"):
            options.enter_context(_kernels.ring_decode_kernel(False))
        if path.endswith("_cublas"):
            options.enter_context(_kernels.narrow_product_kernel(False))
        if path.endswith(("_ungated", "_unfolded")):
            options.enter_context(mock.patch("hf_rolling_cache._compiled.gated_swap", lambda group: None))
        if path.endswith("_unfolded"):  # (another pass: inductor's cache must not hand back the folded code)
            options.enter_context(mock.patch("hf_rolling_cache._fused._fold_residual_adds", lambda graph: None))
            options.enter_context(mock.patch("hf_rolling_cache._fused.SameProducts.uuid", lambda self: b"unfolded"))
        if path.endswith("_unpushed"):
            options.enter_context(mock.patch("hf_rolling_cache._all_reduce._pushed", lambda *args: False))
        if path.endswith("_unsharded"):
            options.enter_context(mock.patch("hf_rolling_cache._compiled.shard_of", lambda module: None))
        if path.endswith("_allrows"):
            options.enter_context(mock.patch("hf_rolling_cache.graphs.last_row_only", lambda model, kwargs: False))
        if path.endswith("_alllayers"):
            options.enter_context(mock.patch("hf_rolling_cache._reach.layers_to_run", lambda windows, *a: len(windows)))
        if path.endswith("_nopdl"):
            options.enter_context(mock.patch.dict("hf_rolling_cache._ring_decode._CONFIG", dependent_launch=False))
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       prefill_chunk_size=chunk_size, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock] if clock else []))
    sync(device)
    return time.perf_counter() - start, cache


def measure(model, path, batch, prompt, new_tokens, device, weights_bytes, bandwidth_tb_s=None,
            repeat: int = 1) -> Result:
    """Time to first token and peak memory from a 1-token generation (the median of ``repeat`` of them, each
    listed in ``ttft_runs_s``: a 32k prompt's first token varies by several percent from run to run on one H100);
    decode speed from the times between tokens of a longer one, past its first decode step. Graph paths first warm
    up at this batch size (compilation happens once per batch size): reported, not counted. With
    ``bandwidth_tb_s``, the decode floor: ``batch`` tokens per (every weight + the whole cache) / bandwidth."""
    result = Result(path, batch, prompt, new_tokens)
    input_ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    try:
        if path.startswith("rolling_graphs") and new_tokens > 1:
            _, warm_cache = run_generate(model, path, input_ids[:, :64], 3, device)
            result.warmup_s = warm_cache.decode_graph_warmup_s
            del warm_cache  # its rings and captured graph
        if "_compiled_prefill" in path:  # its compilations for a first, a later and a last, shorter chunk: not counted
            run_generate(model, path, input_ids[:, : 2 * model.config.sliding_window + 1], 1, device)
        runs = []
        for _ in range(repeat):
            gc.collect()  # drop the last measurement's caches (and any captured graph) before reading the peak
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                result.resident_above_weights_gib = (torch.cuda.memory_allocated() - weights_bytes) / 2**30
            seconds, _ = run_generate(model, path, input_ids, 1, device)
            runs.append(seconds)
            if device.startswith("cuda"):
                peak = (torch.cuda.max_memory_allocated() - weights_bytes) / 2**30
                result.peak_above_weights_gib = max(peak, result.peak_above_weights_gib or 0.0)
        result.ttft_s = statistics.median(runs)
        result.ttft_runs_s = runs if repeat > 1 else None
        if new_tokens > 3:
            clock = StepClock()
            _, cache = run_generate(model, path, input_ids, new_tokens, device, clock)
            result.decode_tok_s = clock.steady_tokens_per_s(batch)
            kv_bytes = cache_bytes(cache)
            result.kv_cache_gib = kv_bytes / 2**30
            if bandwidth_tb_s:
                result.floor_tok_s = batch * bandwidth_tb_s * 1e12 / (weights_bytes + kv_bytes)
            del cache
    except torch.OutOfMemoryError:
        result.error = "OOM"
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    from tqdm import tqdm

    tqdm.write(format_row(result))  # above the progress bar, not inside it
    return result


def format_row(r: Result) -> str:
    def f(value, spec):
        return "-" if value is None else format(value, spec)

    runs = "" if not r.ttft_runs_s else f" (median of {', '.join(format(t, '.3f') for t in r.ttft_runs_s)})"
    return (f"{r.path:28s} B={r.batch:<3d} prompt={r.prompt:<6d} new={r.new_tokens:<5d} ttft={f(r.ttft_s, '.3f')}s{runs} "
            f"decode={f(r.decode_tok_s, '.1f')} tok/s peak-weights={f(r.peak_above_weights_gib, '.2f')} GiB "
            f"(resident {f(r.resident_above_weights_gib, '.3f')}) "
            f"kv={f(r.kv_cache_gib, '.3f')} GiB warm-up={f(r.warmup_s, '.1f')}s"
            + ("" if r.floor_tok_s is None or r.decode_tok_s is None else
               f" floor={r.floor_tok_s:.1f} tok/s ({100 * r.decode_tok_s / r.floor_tok_s:.1f}% of it)")
            + f" {r.error or ''}")


def sweep(model, new_tokens, every, device, compile=False):
    """Per-token decode time and memory along one long generation (rolling path, B=1)."""
    from tqdm import tqdm

    model.set_attn_implementation("rolling_xformers")
    if device.startswith("cuda"):
        hf_rolling_cache.use_cuda_graphs(model, compile=compile)
    cache = RollingSlidingWindowCache(config=model.config, max_length=128 + new_tokens + 1)
    input_ids = torch.randint(1, model.config.vocab_size, (1, 128), device=device)
    points, bar = [], tqdm(total=new_tokens, desc="sweep", file=sys.stderr)
    with torch.no_grad():
        out = model(input_ids=input_ids, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        start, produced = time.perf_counter(), 0
        while produced < new_tokens:
            out = model(input_ids=token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            produced += 1
            bar.update(1)
            if produced % every == 0:
                sync(device)
                now = time.perf_counter()
                allocated = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
                points.append(dict(tokens=produced, ms_per_token=1000 * (now - start) / every,
                                   cache_bytes=cache.memory_bytes(), allocated_bytes=allocated))
                print(f"tokens={produced:6d} {points[-1]['ms_per_token']:.2f} ms/token "
                      f"cache={cache.memory_bytes()} allocated={allocated}", flush=True)
                start = time.perf_counter()
    bar.close()
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["decode", "prefill", "sweep", "grid"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, nargs="+", default=[6000])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--every", type=int, default=1024)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--tiny", action="store_true", help="a small random model (CPU-friendly smoke run)")
    parser.add_argument("--shape", choices=["mistral-7b", *SHAPES], default="mistral-7b",
                        help="the random model's shape (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="sweep: decode with use_cuda_graphs(compile=True)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each row's first token this many times and report the median (default: 1)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.tiny, device, args.shape)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    machine = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"{machine}; torch {torch.__version__}; weights {weights_bytes / 2**30:.2f} GiB", flush=True)

    # warm-up (kernels, xFormers operator choice, compilation at B=1), reported and not counted
    for path in args.paths:
        start = time.perf_counter()
        _, cache = run_generate(model, path, torch.randint(1, 100, (1, 64), device=device), 4, device)
        graph = getattr(cache, "decode_graph_warmup_s", None)
        print(f"warm-up {path}: {time.perf_counter() - start:.1f} s"
              + ("" if graph is None else f" (of which the first decode graph {graph:.1f} s)"), flush=True)
        del cache  # a B=1 ring (0.5 GiB at 7B) would otherwise count in every row's peak

    results: dict = dict(machine=machine, torch=torch.__version__, hf_rolling_cache=hf_rolling_cache.__version__,
                         mode=args.mode, shape="tiny" if args.tiny else args.shape, rows=[])
    if args.mode == "sweep":
        results["rows"] = sweep(model, args.new, args.every, device, args.compile)
        save(results, args.json)
        return
    from tqdm import tqdm

    new_tokens = 1 if args.mode == "prefill" else args.new
    bandwidth = None
    if args.mode == "decode" and device == "cuda":  # each row's floor: weights and cache read once a step
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (run as a script: the project's root)
        from benchmarks.profile_decode import read_bandwidth

        bandwidth = results["copy_bandwidth_tb_s"] = read_bandwidth(1.0) / 1e12
        print(f"copy bandwidth {bandwidth:.2f} TB/s", flush=True)
    grid = [(prompt, batch, path) for prompt in args.prompt for batch in args.batch for path in args.paths]
    for prompt, batch, path in tqdm(grid, desc=args.mode, file=sys.stderr):
        row = measure(model, path, batch, prompt, new_tokens, device, weights_bytes, bandwidth, args.repeat)
        results["rows"].append(asdict(row))
        save(results, args.json)  # after every row: a run cut short keeps what it measured


def save(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
