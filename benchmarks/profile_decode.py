"""Where a decode step's time goes: eager forward, replayed CUDA graph, and the kernels (torch.profiler).

    python -m benchmarks.profile_decode --batch 1 8 --prompt 6000 [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache
from benchmarks.gpu_bench import build_model


def timed(step, repeats: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


@torch.no_grad()
def profile(model, batch: int, prompt: int, top: int, compile: bool = False) -> None:
    device = "cuda"
    model.set_attn_implementation("rolling_xformers")
    hf_rolling_cache.release_cuda_graphs(model)
    cache = RollingSlidingWindowCache(config=model.config)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    for start in range(0, prompt, model.config.sliding_window):
        model(input_ids=ids[:, start : start + model.config.sliding_window], past_key_values=cache, logits_to_keep=1)
    token = torch.ones(batch, 1, dtype=torch.long, device=device)

    def eager():
        model(input_ids=token, past_key_values=cache, logits_to_keep=1)

    eager_ms = timed(eager, 10)
    cache.decode_on_device = True
    device_plan_ms = timed(eager, 10)
    hf_rolling_cache.use_cuda_graphs(model)
    eager()  # capture
    graph_ms = timed(eager, 50)
    compiled_ms = None
    if compile:  # the decoder layers through torch.compile, then captured
        hf_rolling_cache.use_cuda_graphs(model, compile=True)
        cache.decode_graph = None
        eager()
        print(f"  compile + capture {cache.decode_graph_warmup_s:.1f} s", flush=True)
        compiled_ms = timed(eager, 50)
    print(f"B={batch} prompt={prompt}: eager step {eager_ms:.2f} ms, device-planned eager {device_plan_ms:.2f} ms, "
          f"graph replay {graph_ms:.2f} ms ({batch * 1000 / graph_ms:.0f} tok/s ceiling)"
          + ("" if compiled_ms is None else f", compiled graph replay {compiled_ms:.2f} ms "
             f"({batch * 1000 / compiled_ms:.0f} tok/s ceiling)"), flush=True)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eager()  # the replayed graph (compiled, with --compile)
        torch.cuda.synchronize()
    hf_rolling_cache.release_cuda_graphs(model)
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 3 / 1000
    print(f"  kernel time per step: {total:.2f} ms; top kernels (ms per step):")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"    {e.device_time_total / 3 / 1000:7.3f}  x{e.count // 3:<4d} {e.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=6000)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--compile", action="store_true", help="also profile use_cuda_graphs(compile=True)")
    args = parser.parse_args()
    model = build_model(False, "cuda")
    for batch in args.batch:
        profile(model, batch, args.prompt, args.top, args.compile)


if __name__ == "__main__":
    main()
