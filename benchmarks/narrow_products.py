"""Decode-step weight products: cuBLAS (``F.linear``) against our Triton kernel (`_narrow_products`), per product
shape of Mistral-7B (and of one tensor-parallel rank of it) and for a whole step of 32 layers' fused products.

    python -m benchmarks.narrow_products [--batch 1 8] [--block-n 16 32 64] [--block-k 128 256 512]
        [--warps 4 8] [--stages 3 4 5] [--json results/h100/narrow_products.json]

Each product is timed over distinct weights (at least 1 GiB of them, so the 50 MB L2 cache holds none), replayed
as one CUDA graph, against the bandwidth this GPU shows on a large copy: cuBLAS, the package's launch rule
(`launch_for`) and the grid's launches (``--block-k`` in elements of bf16), the best per shape printed. Then a whole
step's products, 32 layers and the head: cuBLAS, the rule (plainly and as dependent launches), the launch best over
all shapes, and each shape's best.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from benchmarks.fused_products import HEADS_DIM, HIDDEN, INTERMEDIATE, KV_DIM, LAYERS, replayed_ms
from benchmarks.profile_decode import read_bandwidth
from hf_rolling_cache import _ring_decode
from hf_rolling_cache._narrow_products import launch_for, narrow_linear

LAUNCH = ("block_n", "block_k", "num_warps", "num_stages")


def shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of a layer's four fused products and the head, on one of ``tp`` ranks."""
    q, kv, inter = HEADS_DIM // tp, KV_DIM // tp, INTERMEDIATE // tp
    return {"qkv": (q + 2 * kv, HIDDEN), "o": (HIDDEN, q), "gate_up": (2 * inter, HIDDEN), "down": (HIDDEN, inter),
            "head": (32000 // tp, HIDDEN)}


def product_us(linear, weights: list[torch.Tensor], x: torch.Tensor) -> float:
    def call():
        for w in weights:
            linear(x, w)

    return 1000 * replayed_ms(call, repeats=10) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--block-k", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--json")
    args = parser.parse_args()
    bandwidth = read_bandwidth(1.0)
    _ring_decode._CONFIG["dependent_launch"] = False  # the grid: launches alone
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    grid = [[n, k, w, s] for n, k, w, s in itertools.product(args.block_n, args.block_k, args.warps, args.stages)]
    rows = []
    totals: dict[tuple, float] = {}  # (tp, batch, launch) -> summed us over the shapes, weighted by use per step
    measured: dict[tuple, int] = {}  # how many shapes each launch ran (one Triton cannot build drops out)
    uses = {"qkv": LAYERS, "o": LAYERS, "gate_up": LAYERS, "down": LAYERS, "head": 1}
    for tp in args.tp:
        for name, (out_features, in_features) in shapes(tp).items():
            nbytes = out_features * in_features * 2
            count = max(4, -(-(1 << 30) // nbytes))
            weights = [torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cuda") / in_features**0.5
                       for _ in range(count)]
            floor_us = 1e6 * nbytes / bandwidth
            for batch in args.batch:
                x = torch.randn(batch, in_features, dtype=torch.bfloat16, device="cuda")
                reference = F.linear(x, weights[0])
                cublas = product_us(F.linear, weights, x)
                rule = launch_for(weights[0])
                rule_us = product_us(lambda a, w: narrow_linear(a, w, None, rule), weights, x)
                rows.append(dict(tp=tp, shape=name, batch=batch, kernels="rule", **dict(zip(LAUNCH, rule)),
                                 us=round(rule_us, 2), of_bandwidth=round(floor_us / rule_us, 3)))
                best = None
                for config in grid:
                    if out_features % config[0] or in_features % config[1]:
                        continue
                    try:
                        got = narrow_linear(x, weights[0], None, config)
                        error = (got.float() - reference.float()).abs().max().item()
                        us = product_us(lambda a, w: narrow_linear(a, w, None, config), weights, x)
                    except Exception as failure:  # a launch Triton cannot build (shared memory): skip it
                        print(f"  {config}: {type(failure).__name__}: {str(failure)[:120]}", flush=True)
                        continue
                    key = (tp, batch, tuple(config))
                    totals[key] = totals.get(key, 0.0) + us * uses[name]
                    measured[key] = measured.get(key, 0) + 1
                    rows.append(dict(tp=tp, shape=name, batch=batch, **dict(zip(LAUNCH, config)), us=round(us, 2),
                                     of_bandwidth=round(floor_us / us, 3), max_error=error))
                    if best is None or us < best[0]:
                        best = (us, config)
                rows.append(dict(tp=tp, shape=name, batch=batch, kernels="cublas", us=round(cublas, 2),
                                 of_bandwidth=round(floor_us / cublas, 3)))
                print(f"tp={tp} {name} {out_features}x{in_features} B={batch}: cuBLAS {cublas:.2f} us "
                      f"({100 * floor_us / cublas:.1f}%), ours by the rule {rule} {rule_us:.2f} us "
                      f"({100 * floor_us / rule_us:.1f}%), ours best {best[0]:.2f} us ({100 * floor_us / best[0]:.1f}%) "
                      f"with {best[1]}", flush=True)
            del weights
            torch.cuda.empty_cache()
    totals = {k: v for k, v in totals.items() if measured[k] == len(uses)}
    for tp in args.tp:
        for batch in args.batch:
            candidates = {k[2]: v for k, v in totals.items() if k[0] == tp and k[1] == batch}
            launch, total = min(candidates.items(), key=lambda item: item[1])
            print(f"tp={tp} B={batch}: best launch over every shape {launch}: {total / 1000:.3f} ms of products a step")
    overall = {(tp, batch): list(min(
        ((k[2], v) for k, v in totals.items() if k[:2] == (tp, batch)), key=lambda item: item[1])[0])
        for tp in args.tp for batch in args.batch}
    per_shape = {}  # (tp, batch, (out, in)) -> the fastest launch for that shape
    for row in rows:
        if row.get("kernels") in ("cublas", "rule"):
            continue
        key = (row["tp"], row["batch"], shapes(row["tp"])[row["shape"]])
        if key not in per_shape or row["us"] < per_shape[key][0]:
            per_shape[key] = (row["us"], [row[k] for k in LAUNCH])
    step_rows = step(args, bandwidth, overall, {k: v[1] for k, v in per_shape.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, rows=rows, step=step_rows),
                      f, indent=1)


def step(args, bandwidth: float, overall: dict, per_shape: dict) -> list[dict]:
    """A whole decode step's products (32 layers, fused q/k/v and gate/up, and the head) with cuBLAS and with ours."""
    results = []
    for tp in args.tp:
        sizes = shapes(tp)
        layers = [{name: torch.randn(*sizes[name], dtype=torch.bfloat16, device="cuda") / sizes[name][1] ** 0.5
                   for name in ("qkv", "o", "gate_up", "down")} for _ in range(LAYERS)]
        head = torch.randn(*sizes["head"], dtype=torch.bfloat16, device="cuda") / HIDDEN**0.5
        weight_bytes = sum(w.numel() * 2 for layer in layers for w in layer.values()) + head.numel() * 2
        floor_ms = 1000 * weight_bytes / bandwidth
        q, inter = sizes["o"][1], sizes["down"][1]
        for batch in args.batch:
            x = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, device="cuda")
            config = overall[tp, batch]
            kinds = (("cublas", F.linear), ("ours_rule", lambda a, w: narrow_linear(a, w, None, launch_for(w))),
                     ("ours", lambda a, w: narrow_linear(a, w, None, config)),
                     ("ours_per_shape", lambda a, w: narrow_linear(a, w, None, per_shape[tp, batch, tuple(w.shape)])))
            for kind, linear in kinds + (("ours_rule_pdl", kinds[1][1]),):
                _ring_decode._CONFIG["dependent_launch"] = kind.endswith("_pdl")
                def call(linear=linear, layers=layers, head=head):
                    h = x
                    for w in layers:
                        qkv = linear(h, w["qkv"])
                        h = linear(qkv[:, :q], w["o"])
                        gate_up = linear(h, w["gate_up"])
                        h = linear(gate_up[:, :inter] * gate_up[:, inter:], w["down"])
                    return linear(h, head)

                ms = replayed_ms(call, repeats=50)
                results.append(dict(tp=tp, batch=batch, kernels=kind, ms=round(ms, 3), floor_ms=round(floor_ms, 3),
                                    of_bandwidth=round(floor_ms / ms, 3), config=config if kind == "ours" else None))
                print(f"step tp={tp} B={batch} {kind}: {ms:.3f} ms (floor {floor_ms:.3f}, "
                      f"{100 * floor_ms / ms:.1f}%)", flush=True)
        del layers, head
        torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
