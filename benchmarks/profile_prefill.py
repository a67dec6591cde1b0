"""Where a long prompt's first token goes: one chunked prefill of the rolling path, its kernels by class.

    python -m benchmarks.profile_prefill --prompt 32768 [--chunk 4096 8192] [--forms eager compiled] [--json F]

The prompt goes through the model chunk by chunk (``prefill_chunk_size``, default the window), as ``generate`` does
with the rolling cache, timed end to end and then once under torch.profiler; ``compiled``: the compiled prefill
of ``use_cuda_graphs(model, compile=True, compile_prefill=True)`` (its warm-up reported, not counted), attending by
cuDNN where cudnn-frontend is installed; ``compiled_flex``: the same by FlexAttention. Kernel classes: weight products
(cuBLAS/cutlass GEMMs), attention (xFormers/flash), copies and index writes (packing, the ring write, the history
gather), and everything else (norms, rotary, activations, adds). Each class against its floor at the matrix rate and
bandwidth this GPU shows on a large bf16 product and a large copy. Then the GPU's idle time between kernels, binned
by length, and how much of it waited for the host (the next kernel launched only after the last one ended); and the
SM clock during one more prefill (`benchmarks.clocks`): at the power cap, idle time is not what sets the pace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import torch

from benchmarks.clocks import ClockSampler
from benchmarks.gpu_bench import build_model
from benchmarks.profile_decode import kernel_class as decode_kernel_class
from benchmarks.profile_decode import read_bandwidth
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache._compiled import CompiledLayers
from hf_rolling_cache._cudnn import _cudnn
from hf_rolling_cache._kept_rows import last_row_only

CLASSES = (  # (class, substrings of kernel names), first match wins: prefill's own split (copies and index writes)
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "softmax")),
    ("weight products", ("gemm", "nvjet", "cutlass", "xmma", "splitk", "cublas", "sm90_xmma")),
    # inductor's fused kernels (an RMSNorm's is named "..._to_copy_add_mean..."): not copies
    ("norms, rotary, activations, adds", ("triton_red_fused", "triton_per_fused")),
    ("copies and index writes", ("index", "copy", "memcpy", "memset", "cat", "scatter", "gather")),
)


def kernel_class(name: str) -> str:
    return decode_kernel_class(name, CLASSES)


def matrix_rate(size: int = 8192) -> float:
    """FLOP/s of a large bf16 product on this GPU."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * size**3 / (time.perf_counter() - start)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk: int, layers=None) -> torch.Tensor:
    """The prompt chunk by chunk; ``layers`` (a `CompiledLayers`): its compiled prefill swapped in, as
    ``use_cuda_graphs(model, compile=True)`` does for each chunk (the last layer computing the last row only). The
    last token's logits."""
    cache = RollingSlidingWindowCache(config=model.config)
    mask = torch.ones_like(ids)
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        kwargs = dict(input_ids=ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache,
                      logits_to_keep=1)
        kept = last_row_only(model, kwargs)
        with layers.prefill_swapped_in(kept) if layers is not None else contextlib.nullcontext():
            out = model(**kwargs)
    return out.logits[:, -1].float()


def profile(model, prompt: int, chunk: int, top: int, layers=None, form: str = "eager") -> dict:
    torch.manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (1, prompt), device="cuda")
    began = time.perf_counter()
    prefill(model, ids[:, : 2 * chunk], chunk, layers)  # warm-up: compilation, xFormers' choice, cuBLAS heuristics
    torch.cuda.synchronize()
    warm_up_s = time.perf_counter() - began
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    start = time.perf_counter()
    logits = prefill(model, ids, chunk, layers)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_gib = (torch.cuda.max_memory_allocated() - weights) / 2**30
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill(model, ids, chunk, layers)
        torch.cuda.synchronize()
    events = prof.key_averages()
    idle = idle_time(prof)
    # the clock in a run of its own (`benchmarks.clocks`: its start-up may hold up the run it samples)
    with ClockSampler() as clocks:
        prefill(model, ids, chunk, layers)
        torch.cuda.synchronize()
    per_class: dict[str, float] = {}
    for event in events:
        label = kernel_class(event.key)
        per_class[label] = per_class.get(label, 0.0) + event.device_time_total / 1e6
    kernels_s = sum(per_class.values())
    config = model.config
    params = sum(p.numel() for p in model.model.layers.parameters())
    product_flops = 2 * params * prompt
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = config.sliding_window
    # each query scores against up to `window` keys (the causal triangle for the first window)
    visible = sum(min(p + 1, window) for p in range(0, prompt, 64)) * 64
    attention_flops = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * visible
    rate = matrix_rate()
    print(f"{form}: warm-up {warm_up_s:.1f} s; prompt {prompt}, chunk {chunk}: first token {seconds:.3f} s, {peak_gib:.3f} GiB above the weights; "
          f"kernels {kernels_s:.3f} s, gaps {seconds - kernels_s:.3f} s; bf16 product rate {rate / 1e12:.0f} TFLOP/s",
          flush=True)
    print(f"  during another prefill: {clocks.describe()}", flush=True)
    floors = {"weight products": product_flops / rate, "attention": attention_flops / rate}
    for label, s in sorted(per_class.items(), key=lambda item: -item[1]):
        floor = floors.get(label)
        print(f"    {label:30s} {s:7.3f} s" + ("" if floor is None else f"  floor {floor:.3f} s at the product rate "
                                                f"({100 * floor / s:.0f}% of it)"), flush=True)
    print("  top kernels (s):")
    for event in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"    {event.device_time_total / 1e6:7.3f}  x{event.count:<5d} [{kernel_class(event.key)}] {event.key[:110]}")
    print_idle(idle)
    return dict(clocks=clocks.summary(), idle=idle, form=form, logits=logits, warm_up_s=warm_up_s, prompt=prompt,
                chunk=chunk, first_token_s=seconds, peak_above_weights_gib=peak_gib,
                kernels_s=kernels_s, per_class_s=per_class, floors_s=floors, product_tflops=rate / 1e12,
                bandwidth_tb_s=read_bandwidth() / 1e12)


GAP_BINS_US = (2, 5, 20, 100, 1000)  # upper bounds of the idle-time bins; the last bin is everything longer


def idle_time(prof, largest: int = 12) -> dict:
    """Where the GPU sat idle between the profiled kernels (and copies), from the profiler's trace.

    A gap is host-bound where the kernel after it was launched after the kernel before it had ended: the GPU waited
    for the host (Python, a synchronization), not for the launch path. Gaps binned by length, the largest listed with
    their neighbours' names."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    launches = {}  # correlation id -> when the host's launch call began (us)
    device = []
    for event in events:
        cat = event.get("cat", "")
        correlation = (event.get("args") or {}).get("correlation")
        if cat in ("cuda_runtime", "cuda_driver") and correlation is not None:
            launches[correlation] = event["ts"]
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset") and event.get("dur") is not None:
            device.append((event["ts"], event["ts"] + event["dur"], event.get("name", "?"), correlation))
    device.sort(key=lambda event: (event[0], event[1]))
    bins = [dict(up_to_us=bound, count=0, total_s=0.0, host_bound_s=0.0) for bound in (*GAP_BINS_US, None)]
    gaps = []
    end = device[0][1] if device else 0.0
    previous = device[0][2] if device else ""
    for start, stop, name, correlation in device[1:]:
        gap = start - end
        if gap > 0:
            launched = launches.get(correlation)
            host_bound = launched is not None and launched > end
            slot = next(b for b in bins if b["up_to_us"] is None or gap <= b["up_to_us"])
            slot["count"] += 1
            slot["total_s"] += gap / 1e6
            slot["host_bound_s"] += gap / 1e6 if host_bound else 0.0
            gaps.append((gap, host_bound, previous, name))
        if stop > end:
            end, previous = stop, name
    gaps.sort(key=lambda g: -g[0])
    return dict(kernels=len(device), launches_seen=len(launches), bins=bins,
                largest=[dict(us=g, host_bound=h, after=a[:80], before=b[:80]) for g, h, a, b in gaps[:largest]])


def print_idle(idle: dict) -> None:
    total = sum(b["total_s"] for b in idle["bins"])
    host = sum(b["host_bound_s"] for b in idle["bins"])
    print(f"  idle between {idle['kernels']} kernels: {total:.4f} s, {host:.4f} s of it waiting for the host "
          f"({idle['launches_seen']} launches seen)")
    low = 0
    for b in idle["bins"]:
        bound = "longer" if b["up_to_us"] is None else f"{low}-{b['up_to_us']} us"
        print(f"    gaps {bound:>12s}: {b['count']:6d}, {b['total_s']:.4f} s ({b['host_bound_s']:.4f} s host-bound)")
        low = b["up_to_us"]
    for g in idle["largest"]:
        waited = "host " if g["host_bound"] else "queue"
        print(f"    {g['us']:9.1f} us {waited}  after {g['after']}  |  before {g['before']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--chunk", type=int, nargs="+", default=[4096])
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--forms", nargs="+", choices=("eager", "compiled", "compiled_flex"), default=["eager"],
                        help="compiled: the prefill of use_cuda_graphs(compile=True, compile_prefill=True) (compiled "
                        "layers; attention by cuDNN where cudnn-frontend is installed, else FlexAttention); "
                        "compiled_flex: the same by FlexAttention")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = build_model(False, "cuda")
    model.set_attn_implementation("rolling_xformers")
    rows = []
    for form in args.forms:
        torch._dynamo.reset()  # each form compiles afresh (its warm-up counts it), as a new process would
        layers = CompiledLayers(model) if form.startswith("compiled") else None
        _cudnn.enabled = form != "compiled_flex"
        rows += [profile(model, args.prompt, chunk, args.top, layers, form) for chunk in args.chunk]
    eager = next((row["logits"] for row in rows if row["form"] == "eager"), None)
    for row in rows:
        logits = row.pop("logits")
        if eager is not None:
            row["max_logit_diff_vs_eager"] = (logits - eager).abs().max().item()
            print(f"{row['form']} chunk {row['chunk']}: largest last-token logit difference from eager "
                  f"{row['max_logit_diff_vs_eager']:.3g}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(machine=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), handle, indent=2)


if __name__ == "__main__":
    main()
