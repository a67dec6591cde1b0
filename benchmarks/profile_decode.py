"""Where a decode step's time goes: eager forward, replayed CUDA graph, and the kernels (torch.profiler), each
class of kernel against its floor (the bytes it must read at the bandwidth this GPU shows on a large copy).

    python -m benchmarks.profile_decode --batch 1 8 --prompt 6000 [--compile] [--json results/h100/profile.json]
    torchrun --nproc_per_node 2 -m benchmarks.profile_decode --tp --compile   # tensor parallel (rank 0 printed)

Kernel classes, by name: weight products (cuBLAS/cutlass GEMM and GEMV, and their split-K reduces), attention over
the ring (SDPA/flash/cuDNN/xFormers, or our Triton kernels, which also write the step's token), the ring write (index
copies, where the attention does not write), everything else (norms, rotary, activations,
adds: inductor's fused kernels or ATen's elementwise ones), all-reduces (tensor parallel), and copies. The step's launch gaps are the replay's wall
time minus the time its kernels ran.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from benchmarks.gpu_bench import build_model
from benchmarks.multi_gpu import say


def timed(step, repeats: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


@torch.no_grad()
def profile(model, batch: int, prompt: int, top: int, compile: bool = False, kv_dtype=None) -> dict:
    model.set_attn_implementation("rolling_xformers")
    hf_rolling_cache.release_cuda_graphs(model)
    cache = RollingSlidingWindowCache(config=model.config, kv_dtype=kv_dtype)
    generator = torch.Generator().manual_seed(batch)  # the same tokens on every tensor-parallel rank
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=generator).to(model.device)
    for start in range(0, prompt, model.config.sliding_window):
        model(input_ids=ids[:, start : start + model.config.sliding_window], past_key_values=cache, logits_to_keep=1)
    token = torch.ones(batch, 1, dtype=torch.long, device=model.device)

    def eager():
        model(input_ids=token, past_key_values=cache, logits_to_keep=1)

    eager()  # untimed: a kernel's first call compiles it (Triton's, per specialization)
    eager_ms = timed(eager, 10)
    cache.decode_on_device = True
    eager()
    device_plan_ms = timed(eager, 10)
    hf_rolling_cache.use_cuda_graphs(model)
    eager()  # capture
    graph_ms = timed(eager, 50)
    compiled_ms = None
    if compile:  # the decoder layers through torch.compile, then captured
        hf_rolling_cache.use_cuda_graphs(model, compile=True)
        cache.decode_graph = None
        eager()
        say(f"  compile + capture {cache.decode_graph_warmup_s:.1f} s")
        compiled_ms = timed(eager, 50)
    say(f"B={batch} prompt={prompt}: eager step {eager_ms:.2f} ms, device-planned eager {device_plan_ms:.2f} ms, "
          f"graph replay {graph_ms:.2f} ms ({batch * 1000 / graph_ms:.0f} tok/s ceiling)"
          + ("" if compiled_ms is None else f", compiled graph replay {compiled_ms:.2f} ms "
             f"({batch * 1000 / compiled_ms:.0f} tok/s ceiling)"))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            eager()  # the replayed graph (compiled, with --compile); every rank replays, each profiles its own
        torch.cuda.synchronize()
    hf_rolling_cache.release_cuda_graphs(model)
    step_ms = compiled_ms if compiled_ms is not None else graph_ms
    return breakdown(model, batch, prof.key_averages(), step_ms, top, kv_dtype)


PROFILED_STEPS = 3
CLASSES = (  # (class, substrings of kernel names), first match wins
    ("all-reduces", ("all_reduce", "allreduce", "nccl", "one_shot", "symm")),
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "softmax", "fwd_kernel_splitk",
                   "_splitk_reduce",  # xFormers' split-K decode (an 8-bit ring)
                   "attend_chunks", "combine_chunks")),  # ours (`_ring_decode`), the ring write included
    ("weight products", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "splitKreduce", "cublas",
                         "narrow_product")),  # ours (`_narrow_products`)
    ("ring write", ("index_copy", "index_put", "scatter", "indexing_backward", "index_elementwise",
                    "amax")),  # the last: an 8-bit ring's quantization, fused with or before its write
    ("copies", ("memcpy", "memset", "copy_kernel")),
)


def kernel_class(name: str, classes=CLASSES) -> str:
    """The first class whose substrings the kernel's name holds, else the elementwise rest."""
    lowered = name.lower()
    for label, needles in classes:
        if any(needle.lower() in lowered for needle in needles):
            return label
    return "norms, rotary, activations, adds"


def read_bandwidth(gib: float = 4.0) -> float:
    """Bytes per second this GPU moves on a large device-to-device copy (read + write)."""
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = timed(lambda: target.copy_(source), 10) / 1000
    return 2 * gib * 2**30 / seconds


def breakdown(model, batch: int, events, step_ms: float, top: int, kv_dtype=None) -> dict:
    """Milliseconds per step by kernel class, each against its floor; prints the top kernels too."""
    config = model.config
    bandwidth = read_bandwidth()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    locals_ = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # a rank's shards
    weight_bytes = sum(p.numel() * p.element_size() for p in locals_)
    kv_heads = config.num_key_value_heads // (dist.get_world_size() if dist.is_initialized() else 1)
    dtype_bytes = next(model.parameters()).element_size()
    slot_bytes = head_dim * dtype_bytes if kv_dtype is None else head_dim + 4  # an 8-bit ring: codes + scale pair
    ring_bytes = 2 * config.num_hidden_layers * batch * config.sliding_window * kv_heads * slot_bytes  # every slot of every ring, keys and values, read once a step
    floors = {"weight products": weight_bytes / bandwidth * 1000, "attention": ring_bytes / bandwidth * 1000}
    per_class: dict[str, float] = {}
    for event in events:
        label = kernel_class(event.key)
        per_class[label] = per_class.get(label, 0.0) + event.device_time_total / PROFILED_STEPS / 1000
    kernels_ms = sum(per_class.values())
    say(f"  read bandwidth {bandwidth / 1e12:.2f} TB/s; step {step_ms:.3f} ms, kernels {kernels_ms:.3f} ms, "
          f"launch gaps {step_ms - kernels_ms:.3f} ms; floor of the step "
          f"{(weight_bytes + ring_bytes) / bandwidth * 1000:.3f} ms ({batch * bandwidth / (weight_bytes + ring_bytes):.0f} "
          "tok/s)")
    for label, ms in sorted(per_class.items(), key=lambda item: -item[1]):
        floor = floors.get(label)
        say(f"    {label:34s} {ms:7.3f} ms" + ("" if floor is None else f"  floor {floor:.3f} ms "
                                                  f"({100 * floor / ms:.0f}% of it)"))
    say("  top kernels (ms per step):")
    for event in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        say(f"    {event.device_time_total / PROFILED_STEPS / 1000:7.3f}  x{event.count // PROFILED_STEPS:<4d} "
              f"[{kernel_class(event.key)}] {event.key[:100]}")
    return dict(batch=batch, step_ms=step_ms, kernels_ms=kernels_ms, launch_gaps_ms=step_ms - kernels_ms,
                bandwidth_tb_s=bandwidth / 1e12, floors_ms=floors, per_class_ms=per_class)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=6000)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--compile", action="store_true", help="also profile use_cuda_graphs(compile=True)")
    parser.add_argument("--json", default=None, help="write the per-class figures here")
    parser.add_argument("--fp8", action="store_true", help="an 8-bit ring (kv_dtype=torch.float8_e4m3fn)")
    parser.add_argument("--tp", action="store_true",
                        help="under torchrun: the Mistral-7B checkpoint of benchmarks.multi_gpu with tp_plan='auto'")
    args = parser.parse_args()
    if args.tp:
        from benchmarks import multi_gpu

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        model = multi_gpu.load(multi_gpu.checkpoint_folder(), "tp", torch.bfloat16)
    else:
        model = build_model(False, "cuda")
    kv_dtype = torch.float8_e4m3fn if args.fp8 else None
    rows = [profile(model, batch, args.prompt, args.top, args.compile, kv_dtype) for batch in args.batch]
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.barrier()
        hf_rolling_cache.release_cuda_graphs(model)  # a live captured step holds NCCL's all-reduces
        dist.destroy_process_group()
    if args.json and not (args.tp and int(os.environ.get("RANK", 0))):
        with open(args.json, "w") as handle:
            json.dump(dict(machine=torch.cuda.get_device_name(), torch=torch.__version__, prompt=args.prompt,
                           compiled=args.compile, tensor_parallel=ranks, fp8_ring=args.fp8,
                           rows=rows), handle, indent=2)


if __name__ == "__main__":
    main()
