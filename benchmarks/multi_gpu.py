"""Several GPUs: a Mistral-7B-shaped checkpoint (random weights, W=4096) split over two GPUs by ``device_map``, or
tensor parallel, against one GPU and Transformers' own paths. Run on a machine with two GPUs:

    python -m benchmarks.multi_gpu one   --json results/h100x2/one_gpu.json    # the one-GPU baseline
    python -m benchmarks.multi_gpu split --json results/h100x2/split.json      # layers 0-15 on GPU 0, 16-31 on GPU 1
    torchrun --nproc_per_node 2 -m benchmarks.multi_gpu tp --json results/h100x2/tp.json   # tp_plan="auto"

Each run loads the checkpoint the way users do (``from_pretrained``; it is written once with ``save_pretrained``
into ``$CHECKPOINT``, default the temp folder), then
1. fp32 exactness: a left-padded batch of 5000, 4097 and 300 random tokens, 48 greedy tokens with Transformers'
   own path (sdpa, DynamicCache) and with ``enable(model)``, eagerly and with CUDA graphs (plain and compiled): the
   tokens must be the same and the largest logit difference is printed (``--check-only`` stops here;
   ``--skip-check`` skips it);
2. bf16 speed: decode tokens/s at B=1 and 8 (6000-token prompts, 128 new tokens, measured between tokens after the
   first decode step), the time to the first token of a 32k-token prompt, and each GPU's peak memory above its
   weights, for Transformers' DynamicCache+sdpa and the rolling paths (eager, CUDA graphs, compiled graphs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.distributed import DistributedConfig

import hf_rolling_cache
from benchmarks.gpu_bench import StepClock, build_model, run_generate
from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache.tools.models import ragged_batch

SPEED_PATHS = ["hf_dynamic_sdpa", "rolling", "rolling_graphs", "rolling_graphs_compiled"]
RAGGED = (5000, 4097, 300)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def say(*args) -> None:
    if rank() == 0:
        print(*args, flush=True)


def checkpoint_folder() -> str:
    folder = os.environ.get("CHECKPOINT", os.path.join(tempfile.gettempdir(), "mistral-7b-random"))
    if rank() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        started = time.perf_counter()
        model = build_model(False, "cuda:0")  # Mistral-7B shape, random bf16 weights
        model.save_pretrained(folder)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        say(f"wrote {folder} in {time.perf_counter() - started:.1f} s")
    if dist.is_initialized():
        dist.barrier()
    return folder


def load(folder: str, mode: str, dtype: torch.dtype):
    started = time.perf_counter()
    if mode == "split":
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
        device_map |= {f"model.layers.{i}": int(i >= 16) for i in range(32)}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
    elif mode == "tp":
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto"))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cuda:0")
    model.eval()
    model.generation_config.pad_token_id = 0
    say(f"loaded {mode} {dtype} in {time.perf_counter() - started:.1f} s")
    return model


def devices(model) -> list[torch.device]:
    return sorted({p.device for p in model.parameters()}, key=str)


def weights_on(model) -> dict[str, int]:
    on: dict[str, int] = {}
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        on[str(p.device)] = on.get(str(p.device), 0) + local.numel() * local.element_size()
    return on


def sync_all() -> None:
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def random_tokens(model, batch: int, length: int) -> torch.Tensor:
    """The same tokens on every rank (tensor parallel ranks must see one batch)."""
    generator = torch.Generator().manual_seed(batch * 100003 + length)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=generator).to(model.device)


def check(model, new_tokens: int = 48) -> dict:
    """Transformers' own tokens in fp32, eagerly and under graphs (compiled or not)."""
    input_ids, attention_mask = (t.to(model.device) for t in ragged_batch(list(RAGGED), model.config.vocab_size))
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                   output_scores=True, return_dict_in_generate=True)
    model.set_attn_implementation("sdpa")
    reference = model.generate(**options, past_key_values=DynamicCache(config=model.config))
    rows = {"transformers": reference.sequences[:, -new_tokens:].tolist()}
    for path in ("rolling", "rolling_graphs", "rolling_graphs_compiled"):
        hf_rolling_cache.enable(model)
        if path != "rolling":
            hf_rolling_cache.use_cuda_graphs(model, compile=path == "rolling_graphs_compiled")
        cache = RollingSlidingWindowCache(config=model.config)
        try:
            got = model.generate(**options, past_key_values=cache)
            replayed = getattr(cache.decode_graph, "segments", None) is not None  # (release frees the graph)
        except Exception as error:  # noqa: BLE001 - reported, the speed runs still follow
            rows[f"{path}_error"] = repr(error)[:500]
            say(f"fp32 {path}: {error!r}")
            continue
        finally:
            hf_rolling_cache.release_cuda_graphs(model)
            hf_rolling_cache.disable(model)
        worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(got.scores, reference.scores))
        same = torch.equal(got.sequences, reference.sequences)
        rows[path] = got.sequences[:, -new_tokens:].tolist()
        rows[f"{path}_same_tokens"] = same
        rows[f"{path}_max_logit_diff"] = worst
        rows[f"{path}_replayed"] = replayed
        say(f"fp32 {path}: same tokens as Transformers: {same}; max logit diff {worst:.2e}; "
            f"graph replayed: {rows[f'{path}_replayed']}")
    return rows


def measure(model, path: str, batch: int, prompt: int, new_tokens: int, weights: dict[str, int]) -> dict:
    row = dict(path=path, batch=batch, prompt=prompt, new_tokens=new_tokens)
    input_ids = random_tokens(model, batch, prompt)
    device = str(model.device)
    try:
        if path.startswith("rolling_graphs") and new_tokens > 1:
            _, warm = run_generate(model, path, input_ids[:, :64], 3, device)
            row["warmup_s"] = warm.decode_graph_warmup_s
            del warm
        gc.collect()
        torch.cuda.empty_cache()
        for d in devices(model):
            torch.cuda.reset_peak_memory_stats(d)
        sync_all()
        row["ttft_s"], _ = run_generate(model, path, input_ids, 1, device)
        row["peak_above_weights_gib"] = {
            str(d): round((torch.cuda.max_memory_allocated(d) - weights.get(str(d), 0)) / 2**30, 3)
            for d in devices(model)}
        if new_tokens > 3:
            clock = StepClock()
            _, cache = run_generate(model, path, input_ids, new_tokens, device, clock)
            row["decode_tok_s"] = round(clock.steady_tokens_per_s(batch), 1)
            row["replayed"] = getattr(getattr(cache, "decode_graph", None), "segments", None) is not None
            del cache
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as error:  # noqa: BLE001 - a row that fails is reported, the others still run
        row["error"] = repr(error)[:500]
    finally:
        hf_rolling_cache.release_cuda_graphs(model)
        gc.collect()
        torch.cuda.empty_cache()
    say(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["one", "split", "tp"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=6000)
    parser.add_argument("--long-prompt", type=int, default=32768, help="the time-to-first-token prompt (0: none)")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--paths", nargs="+", default=SPEED_PATHS)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sync-stop", action="store_true",
                        help="generate checks for the end after every step, as before (no step-late stop check)")
    args = parser.parse_args()
    baseline_switches(args.sync_stop)
    if args.mode == "tp":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    folder = checkpoint_folder()
    results = dict(mode=args.mode, machine=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                   torch=torch.__version__, launch_blocking=os.environ.get("CUDA_LAUNCH_BLOCKING", "0"),
                   sync_stop=args.sync_stop)

    if not args.skip_check:
        model = load(folder, args.mode, torch.float32)
        results["fp32_check"] = check(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        save(results, args.json)
        if args.check_only:
            return

    model = load(folder, args.mode, torch.bfloat16)
    weights = weights_on(model)
    results["weights_gib"] = {d: round(b / 2**30, 2) for d, b in weights.items()}
    say(f"weights per device: {results['weights_gib']}")
    for path in args.paths:  # warm-up: kernels, xFormers' operator choice
        try:
            run_generate(model, path, random_tokens(model, 1, 64), 4, str(model.device))
        except Exception as error:  # noqa: BLE001 - its rows will say so too
            say(f"warm-up {path}: {error!r}"[:800])
        hf_rolling_cache.release_cuda_graphs(model)
    results["rows"] = []
    for batch in args.batch:
        for path in args.paths:
            results["rows"].append(measure(model, path, batch, args.prompt, args.new, weights))
            save(results, args.json)
    if args.long_prompt:
        for path in [p for p in ("hf_dynamic_sdpa", "rolling") if p in args.paths]:
            results["rows"].append(measure(model, path, 1, args.long_prompt, 1, weights))
            save(results, args.json)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def baseline_switches(sync_stop: bool) -> None:
    """Turn off this plugin's step-late stop check, to measure what it brings."""
    from hf_rolling_cache import _stop_check

    if sync_stop:
        _stop_check.DeferredForReplays.is_supported = staticmethod(_stop_check._TRANSFORMERS_CHECK.is_supported)


def save(results: dict, path: str | None) -> None:
    if path and rank() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
