"""One layer's prefill attention over a long prompt, chunk by chunk, by each kernel this GPU offers.

    python -m benchmarks.prefill_attention [--prompt 32768] [--window 4096] [--json out.json]

Mistral-7B's heads (32 query, 8 key/value, d=128), bf16, one sequence, chunks of the window: the first chunk
attends causally to itself, each later one to the W tokens held before it and itself (the seed's "later chunks
over the un-rotated cache"), each query to the window ending at itself. Every kernel's output is compared with
xFormers' (the eager prefill's); times are per layer for the whole prompt (each call's host work included, but not
the plan's, nor what it puts on the device: a model does that once a forward for its 32 layers), and the rate is on the visible
(in-window, causal) scores. `cudnn_ours` is the compiled prefill's where cudnn-frontend is installed (`_cudnn`),
`flex_ours` where it is not (`_flex`); `flex` uses PyTorch's
``create_block_mask`` with static shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from hf_rolling_cache._cudnn import cudnn_packed
from hf_rolling_cache._flex import flex_packed
from hf_rolling_cache._kernels import _grouped_xformers
from hf_rolling_cache._plan import build_plan


def chunks(prompt: int, window: int):
    """(start, held) of each chunk: its first position and how many earlier tokens it attends to."""
    return [(start, min(start, window)) for start in range(0, prompt, window)]


def visible_scores(prompt: int, window: int) -> int:
    return sum(min(p + 1, window) for p in range(prompt))


@functools.cache
def plan_of(start: int, length: int, window: int):
    """One plan per chunk, shared by every kernel and repeat: a model builds it once a forward for its 32 layers,
    with what it puts on the device (indices, block mask, offsets)."""
    return build_plan(window=window, q_length=length, q_seqlens=(length,), seen=(start,))


def xformers_chunk(q, k, v, start, held, window, scale):
    plan = plan_of(start, q.shape[0], window)
    return _grouped_xformers(q, k, v, plan, scale)


def _causal_with_lse(q, k, v, scale):
    """``[1, H, L, D]`` causal attention and its log-sum-exp ``[1, H, L]``, by PyTorch's flash kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]


def split_chunk(q, k, v, start, held, window, scale):
    """The chunk's own keys causally, plus its held keys: query i sees held key m iff m >= i, which is causal
    once both are reversed; the two parts merged by their log-sum-exps."""
    length, heads, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads

    def bhld(x):  # [T, H, D] -> [1, H, T, D] (a view), key/value heads repeated for the query heads
        x = x.unsqueeze(0).transpose(1, 2)
        if x.shape[1] != heads:
            x = x.repeat_interleave(group, dim=1)
        return x

    own_q = bhld(q)
    own_out, own_lse = _causal_with_lse(own_q, bhld(k[held:]), bhld(v[held:]), scale)
    if held == 0:
        return own_out[0].transpose(0, 1)
    # Query i (position start+i) sees the held keys after position start+i-W: the newest W-1-i of them. Reversed
    # (i' = L-1-i, newest key first) query i' sees i' keys, strictly before it: causal once query i' = 0 (which
    # sees none) is dropped. Needs a chunk of exactly the window (L = W).
    seen = window - 1
    rev_q = torch.flip(own_q, dims=[2])[:, :, 1:]  # queries W-2 .. 0
    rev_k = torch.flip(bhld(k[held - seen:held]), dims=[2])
    rev_v = torch.flip(bhld(v[held - seen:held]), dims=[2])
    held_out, held_lse = _causal_with_lse(rev_q, rev_k, rev_v, scale)
    held_out = torch.flip(held_out, dims=[2])  # queries 0 .. W-2 in order
    held_lse = torch.flip(held_lse, dims=[2])
    held = seen
    out = own_out.float()
    lse_own = own_lse[:, :, :held]
    total = torch.logaddexp(lse_own, held_lse)
    out[:, :, :held] = (own_out[:, :, :held].float() * torch.exp(lse_own - total).unsqueeze(-1)
                        + held_out.float() * torch.exp(held_lse - total).unsqueeze(-1))
    return out.to(q.dtype)[0].transpose(0, 1)


def cudnn_ours(q, k, v, start, held, window, scale):
    """The compiled prefill's attention where cudnn-frontend is installed: cuDNN's band over ragged sequences
    (`_cudnn`)."""
    plan = plan_of(start, q.shape[0], window)
    out = cudnn_packed(q, k, v, plan, scale)
    if out is None:
        raise RuntimeError("cuDNN refused these inputs (see the warning)")
    return out


def flex_ours(q, k, v, start, held, window, scale):
    """The shipped compiled prefill's attention: FlexAttention over the plan's key ranges (`_flex`)."""
    plan = plan_of(start, q.shape[0], window)
    return flex_packed(q, k, v, plan, scale)


def flex_runner(window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v, start, held, window_, scale):
        length = q.shape[0]
        key = (length, held)
        if key not in masks:
            def sliding(b, h, qi, ki):
                return (ki <= qi + held) & (ki > qi + held - window)
            masks[key] = create_block_mask(sliding, None, None, length, held + length, device=q.device)
        out = compiled(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2),
                       block_mask=masks[key], scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    return run


def time_layer(run, tensors, prompt, window, scale, repeats=3):
    """Seconds for one layer's whole prompt (every chunk), best of ``repeats``; and the last chunk's output."""
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for start, held in chunks(prompt, window):
            q, k, v = tensors[start]
            out = run(q, k, v, start, held, window, scale)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - begin)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, kv_heads, dim, window, prompt = 32, 8, 128, args.window, args.prompt
    scale = dim ** -0.5
    device = "cuda"
    tensors = {}
    for start, held in chunks(prompt, window):
        length = min(window, prompt - start)
        tensors[start] = (torch.randn(length, heads, dim, device=device, dtype=torch.bfloat16),
                          torch.randn(held + length, kv_heads, dim, device=device, dtype=torch.bfloat16),
                          torch.randn(held + length, kv_heads, dim, device=device, dtype=torch.bfloat16))
    flops = 4 * visible_scores(prompt, window) * heads * dim
    runs = {
        "xformers": xformers_chunk,
        "flex_ours": flex_ours,
        "cudnn_ours": cudnn_ours,
        "split_flash": split_chunk,  # two causal flash calls, merged
        "flex": flex_runner(window),
    }
    results, reference = {}, None
    for name, run in runs.items():
        try:
            seconds, out = time_layer(run, tensors, prompt, window, scale)
        except Exception as error:  # a kernel this build lacks: say so and go on
            print(f"{name:12s} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        if reference is None:
            reference = out.float()
        diff = (out.float() - reference).abs().max().item()
        results[name] = {"layer_s": seconds, "model_s": 32 * seconds, "tflops": flops / seconds / 1e12,
                         "max_diff_vs_xformers": diff}
        print(f"{name:12s} {seconds * 1e3:8.2f} ms/layer  x32 {32 * seconds:6.3f} s  {flops / seconds / 1e12:6.1f} "
              f"TFLOP/s  max diff {diff:.3g}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompt": prompt, "window": window, "device": torch.cuda.get_device_name(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
