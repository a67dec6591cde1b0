"""Decode attention over a full ring, one layer of Mistral-7B's shape (32 query heads over 8 kv heads of 128, W=4096,
bf16), replayed as a CUDA graph of 32 calls: SDPA with grouped query heads (``enable_gqa``) against SDPA with each
kv head's query heads packed as query rows (``[B, H_kv, G, D]``: one pass over a kv head's keys for its whole group),
with and without the key mask, and our Triton kernels (`_ring_decode`: the step's write included; "masked": the
same kernels with per-row key lengths, a few slots unfilled) at several grid sizes, against the floor (the ring's
bytes at the bandwidth of a large copy).

    python -m benchmarks.decode_attention [--batch 1 8 32] [--programs-per-sm 2 4 8] [--json results/h100/decode_attention.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from benchmarks.fused_products import replayed_ms
from benchmarks.profile_decode import read_bandwidth
from hf_rolling_cache import _ring_decode

HEADS, KV_HEADS, HEAD_DIM, WINDOW, LAYERS = 32, 8, 128, 4096, 32


def attention(kind: str, query, keys, values, mask):
    if kind == "gqa":
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    batch = query.shape[0]
    packed = query.reshape(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    return F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask).reshape(batch, HEADS, 1, HEAD_DIM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[_ring_decode._CONFIG["programs_per_sm"]],
                        help="grid sizes tried for the ring kernels (the split of a row's slots)")
    parser.add_argument("--block", type=int, nargs="+", default=[64], help="slots per inner step, tried")
    parser.add_argument("--warps", type=int, nargs="+", default=[_ring_decode._CONFIG["num_warps"]])
    parser.add_argument("--stages", type=int, nargs="+", default=[_ring_decode._CONFIG["num_stages"]])
    parser.add_argument("--json")
    args = parser.parse_args()
    bandwidth = read_bandwidth(1.0)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    default_config = dict(_ring_decode._CONFIG)
    configs = list(itertools.product(args.programs_per_sm, args.block, args.warps, args.stages))
    for batch in args.batch:
        query = torch.randn(batch, HEADS, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        rings = [(torch.randn(batch, KV_HEADS, WINDOW, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
                  torch.randn(batch, KV_HEADS, WINDOW, HEAD_DIM, dtype=torch.bfloat16, device="cuda"))
                 for _ in range(LAYERS)]
        mask = torch.ones(batch, 1, 1, WINDOW, dtype=torch.bool, device="cuda")
        mask[:, :, :, -7:] = False  # a few slots unfilled: the masked kernel runs
        floor_us = 1e6 * 2 * keys_bytes(rings[0][0]) / bandwidth
        expected = {}
        for masked in (False, True):
            for kind in ("gqa", "packed"):
                def step(kind=kind, masked=masked):
                    for keys, values in rings:
                        out = attention(kind, query, keys, values, mask if masked else None)
                    return out

                got = step()
                if kind == "gqa":
                    expected[masked] = got
                error = (got.float() - expected[masked].float()).abs().max().item()
                us = 1000 * replayed_ms(step) / LAYERS
                rows.append(dict(batch=batch, kind=kind, masked=masked, us_per_layer=round(us, 2),
                                 floor_us=round(floor_us, 2), max_diff_vs_gqa=error))
                print(f"B={batch:<3} {kind:<6} {'masked  ' if masked else 'unmasked'} {us:7.2f} us per layer "
                      f"(floor {floor_us:.2f} us, {100 * floor_us / us:.0f}%), max diff vs gqa {error:.2e}", flush=True)
            # ours: the [B, W, H_kv, D] storage; each row writes into the last slot it attends over what that slot
            # already holds (so every replay reads the same ring, and the answer is SDPA's over it)
            filled = WINDOW - 7 if masked else WINDOW
            storage = [(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for k, v in rings]
            tokens = [(k[:, filled - 1].clone(), v[:, filled - 1].clone()) for k, v in storage]
            slots = torch.arange(batch, device="cuda") * WINDOW + filled - 1
            lengths = torch.full((batch,), filled, dtype=torch.int32, device="cuda")
            for per_sm, block, warps, stages in configs:
                _ring_decode._CONFIG.update(programs_per_sm=per_sm, block=block, num_warps=warps, num_stages=stages)
                splits, chunk = _ring_decode.split_count(batch, KV_HEADS, WINDOW, block, query.device)
                kind = f"ring kernel {per_sm}/sm b{block} w{warps} s{stages}"

                def step():
                    for (keys, values), (new_keys, new_values) in zip(storage, tokens):
                        out = _ring_decode.ring_attention(query, new_keys, new_values, keys, values, slots, None,
                                                          lengths, WINDOW, HEAD_DIM ** -0.5)
                    return out.transpose(1, 2)  # [B, H_q, 1, D], as SDPA's

                got = step()
                error = (got.float() - expected[masked].float()).abs().max().item()
                us = 1000 * replayed_ms(step) / LAYERS
                rows.append(dict(batch=batch, kind=kind, masked=masked, splits=splits, chunk=chunk,
                                 us_per_layer=round(us, 2), floor_us=round(floor_us, 2), max_diff_vs_gqa=error))
                print(f"B={batch:<3} {kind:<30} {'masked  ' if masked else 'unmasked'} {us:7.2f} us per layer "
                      f"({splits} chunks of {chunk}; {100 * floor_us / us:.0f}% of floor), max diff vs gqa "
                      f"{error:.2e}", flush=True)
            _ring_decode._CONFIG.update(default_config)
            storage = tokens = None  # free the copies before the next batch
    for batch in args.batch:
        for masked in (False, True):
            ours = [r for r in rows if r["batch"] == batch and r["masked"] == masked and r["kind"].startswith("ring")]
            sdpa = next(r for r in rows if r["batch"] == batch and r["masked"] == masked and r["kind"] == "gqa")
            best = min(ours, key=lambda r: r["us_per_layer"])
            print(f"best B={batch} {'masked' if masked else 'unmasked'}: {best['kind']} {best['us_per_layer']} us "
                  f"(SDPA {sdpa['us_per_layer']} us without the write)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, rows=rows), f, indent=1)


def keys_bytes(keys: torch.Tensor) -> int:
    return keys.numel() * keys.element_size()


if __name__ == "__main__":
    main()
