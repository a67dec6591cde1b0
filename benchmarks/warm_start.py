"""Warm start of ``use_cuda_graphs(model, compile=True)``: how long the first decode step takes (compilation, then
the capture) in a first process with empty PyTorch compile caches, and again in a second process that finds them.

    python -m benchmarks.warm_start --json results/h100/warm_start.json     # on a GPU: the Mistral-7B shape
    python -m benchmarks.warm_start --tiny                                 # on the CPU: compiled layers only

Each process is a fresh Python (``subprocess``) sharing one folder of compile caches (``TORCHINDUCTOR_CACHE_DIR``
and ``TRITON_CACHE_DIR``, empty before the first). On a GPU it loads the 7B checkpoint of ``benchmarks.multi_gpu``
(written once, before the timed processes; random bf16 weights), generates 3 tokens from a 64-token prompt at each
batch size with compiled graphs, and reports ``cache.decode_graph_warmup_s`` per batch size (the first decode step's
compilation and capture) and the whole generate call. With ``--tiny`` (no GPU) there is no capture: it times the
compiled decoder layers of a small 32-layer model through two decode steps (inductor's CPU code), which shows how
the compile cost scales with depth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def one_process(tiny: bool, batches: list[int]) -> dict:
    """Runs in the child: the timings of one fresh process."""
    import torch

    import hf_rolling_cache
    from hf_rolling_cache import RollingSlidingWindowCache

    started = time.perf_counter()
    if tiny:
        from hf_rolling_cache._compiled import CompiledLayers
        from hf_rolling_cache.tools.models import ragged_batch, tiny_mistral_config
        from transformers import MistralForCausalLM

        torch.manual_seed(0)
        model = MistralForCausalLM(tiny_mistral_config(4, layers=32)).eval()
        hf_rolling_cache.enable(model)
        compiled = CompiledLayers(model)
        rows = []
        for batch in batches:
            input_ids, attention_mask = ragged_batch([7] * batch)
            cache = RollingSlidingWindowCache(config=model.config)
            cache.decode_on_device = True
            with torch.no_grad():
                out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
                begun = time.perf_counter()
                for _ in range(2):
                    token = out.logits[:, -1:].argmax(-1)
                    attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
                    with compiled.swapped_in(cache):
                        out = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache)
            rows.append(dict(batch=batch, compiled_decode_steps_s=round(time.perf_counter() - begun, 2)))
        return dict(rows=rows, process_s=round(time.perf_counter() - started, 2))

    from benchmarks.multi_gpu import checkpoint_folder, load

    model = load(checkpoint_folder(), "one", torch.bfloat16)
    hf_rolling_cache.enable(model)
    hf_rolling_cache.use_cuda_graphs(model, compile=True)
    loaded = time.perf_counter() - started
    rows = []
    for batch in batches:
        input_ids = torch.randint(1, model.config.vocab_size, (batch, 64), device=model.device)
        cache = RollingSlidingWindowCache(config=model.config)
        torch.cuda.synchronize()
        begun = time.perf_counter()
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                       max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        warmup = cache.decode_graph_warmup_s  # None: no step was captured (the model decoded eagerly)
        rows.append(dict(batch=batch, decode_graph_warmup_s=None if warmup is None else round(warmup, 2),
                         generate_s=round(time.perf_counter() - begun, 2)))
    return dict(rows=rows, load_s=round(loaded, 2), process_s=round(time.perf_counter() - started, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="no GPU: a small model's compiled layers on the CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_process(args.tiny, args.batch)), flush=True)
        return

    if not args.tiny:  # written once, before the timed processes (its writing is no part of a cold start)
        from benchmarks.multi_gpu import checkpoint_folder

        checkpoint_folder()
    caches = tempfile.mkdtemp(prefix="warm-start-caches-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
           "TRITON_CACHE_DIR": os.path.join(caches, "triton")}
    command = [sys.executable, "-m", "benchmarks.warm_start", "--child", "--batch", *map(str, args.batch)]
    command += ["--tiny"] if args.tiny else []
    results = dict(tiny=args.tiny, processes=[])
    try:
        for name in ("first process (empty caches)", "second process (caches from the first)"):
            run = subprocess.run(command, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{name} failed ({run.returncode}):\n{run.stderr[-6000:]}")
            line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
            result = dict(process=name, **json.loads(line[len("RESULT "):]))
            results["processes"].append(result)
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
