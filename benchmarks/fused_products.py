"""Is fusing a layer's weight products worth it? The decode step's seven weight products per layer (q, k, v, o,
gate, up, down), against four (one product over the concatenated q/k/v weights, o, one over gate/up, down), for 32
layers of Mistral-7B's shapes, replayed as one CUDA graph, at the bandwidth this GPU shows on a large copy.

    python -m benchmarks.fused_products [--batch 1 8] [--tp 1 2] [--json results/h100/fused_products.json]

``--tp 2`` runs one rank's shapes under tensor parallelism (q/k/v and gate/up split by columns, o and down by rows):
the products each GPU runs, without the all-reduces. The weights are random bf16; the figure is the time per step
of the products alone and the fraction of copy bandwidth it reaches.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.profile_decode import read_bandwidth

HIDDEN, HEADS_DIM, KV_DIM, INTERMEDIATE, LAYERS = 4096, 4096, 1024, 14336, 32


def layer_weights(tp: int, fused: bool) -> list[dict[str, torch.Tensor]]:
    q, kv, inter = HEADS_DIM // tp, KV_DIM // tp, INTERMEDIATE // tp

    def weight(rows, columns):
        return torch.randn(rows, columns, dtype=torch.bfloat16, device="cuda") / columns**0.5

    layers = []
    for _ in range(LAYERS):
        if fused:
            layers.append(dict(qkv=weight(q + 2 * kv, HIDDEN), o=weight(HIDDEN, q), gate_up=weight(2 * inter, HIDDEN),
                               down=weight(HIDDEN, inter)))
        else:
            layers.append(dict(q=weight(q, HIDDEN), k=weight(kv, HIDDEN), v=weight(kv, HIDDEN), o=weight(HIDDEN, q),
                               gate=weight(inter, HIDDEN), up=weight(inter, HIDDEN), down=weight(HIDDEN, inter)))
    return layers


def step_of(layers, x: torch.Tensor, tp: int, fused: bool):
    q, inter = HEADS_DIM // tp, INTERMEDIATE // tp

    def step():
        h = x
        for w in layers:
            if fused:
                qkv = F.linear(h, w["qkv"])
                attended = qkv[:, :q]  # stands in for attention: same shape as its output
                h = F.linear(attended, w["o"])
                gate_up = F.linear(h, w["gate_up"])
                h = F.linear(gate_up[:, :inter] * gate_up[:, inter:], w["down"])
            else:
                attended, _, _ = F.linear(h, w["q"]), F.linear(h, w["k"]), F.linear(h, w["v"])
                h = F.linear(attended, w["o"])
                h = F.linear(F.linear(h, w["gate"]) * F.linear(h, w["up"]), w["down"])
        return h

    return step


def replayed_ms(step, repeats: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--autotune", action="store_true",
                        help="also the fused products through torch.compile(mode='max-autotune-no-cudagraphs')")
    parser.add_argument("--json")
    args = parser.parse_args()
    bandwidth = read_bandwidth(1.0)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for tp in args.tp:
        for fused in (False, True):
            layers = layer_weights(tp, fused)
            weight_bytes = sum(t.numel() * t.element_size() for w in layers for t in w.values())
            floor_ms = 1000 * weight_bytes / bandwidth
            for batch in args.batch:
                x = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, device="cuda")
                kinds = ["cublas"] + (["autotuned"] if args.autotune and fused else [])
                for kind in kinds:
                    step = step_of(layers, x, tp, fused)
                    if kind == "autotuned":
                        step = torch.compile(step, mode="max-autotune-no-cudagraphs")
                    ms = replayed_ms(step)
                    rows.append(dict(tp=tp, fused=fused, kernels=kind, batch=batch, ms=round(ms, 3),
                                     floor_ms=round(floor_ms, 3), of_bandwidth=round(floor_ms / ms, 3)))
                    print(f"tp={tp} {'fused' if fused else 'separate'} {kind} B={batch}: {ms:.3f} ms per step of "
                          f"products (floor {floor_ms:.3f} ms, {100 * floor_ms / ms:.1f}% of copy bandwidth)",
                          flush=True)
            del layers
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
