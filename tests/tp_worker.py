"""Started by tests/test_tensor_parallel.py under ``torchrun --nproc_per_node 2`` (two GPUs, or the CPU over gloo):
loads a checkpoint with Transformers' tensor parallelism (``DistributedConfig(tp_plan="auto")``, each process
holding half of every layer's heads and MLP), generates with the rolling cache, and rank 0 saves the tokens and
scores.

    torchrun --nproc_per_node 2 tests/tp_worker.py CHECKPOINT eager|graphs|compiled|products|repeat OUT.pt

``products`` (CPU): the whole generate through the compiled step's forwards (dynamo's eager backend), each shard's
product by our kernel in Triton's interpreter; rank 0 also saves which products the kernel made. ``repeat`` (two
GPUs): bfloat16 generations with pushed and with one-shot sums, alternating (`repeat`).
"""

import contextlib
import gc
import sys
from collections import Counter

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache, _all_reduce, _compiled

_compiled.EAGER_ON_COMPILE_ERROR = False  # as in the tests' own process (conftest): a failed compilation fails


def main(checkpoint: str, path: str, out: str) -> None:
    if path == "repeat":
        return repeat(checkpoint, out)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, distributed_config=DistributedConfig(tp_plan="auto"))
    hf_rolling_cache.enable(model, prefill_chunk_size=model.config.sliding_window)
    if path in ("graphs", "compiled"):
        hf_rolling_cache.use_cuda_graphs(model, compile=path == "compiled")
    batch = torch.load(f"{checkpoint}/batch.pt")
    cache = RollingSlidingWindowCache(config=model.config)
    products, step = Counter(), contextlib.nullcontext()
    if path == "products":
        step = products_on_shards(model, products)
    with step:
        got = model.generate(**{k: v.to(model.device) for k, v in batch.items()}, past_key_values=cache,
                             max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    replayed = getattr(cache.decode_graph, "segments", None) is not None  # a captured graph, not eager steps
    one_shot = _all_reduce.captured_one_shots()  # all-reduces recorded one-shot over symmetric memory
    pushed = _all_reduce.captured_pushed_sums()  # of which pushed into the other GPU's landing buffer
    if dist.get_rank() == 0:
        torch.save(dict(sequences=got.sequences.cpu(), scores=[s.cpu() for s in got.scores], replayed=replayed,
                        one_shot=one_shot, pushed=pushed, kv_heads=cache.layers[0].keys.shape[1],
                        products=dict(products)), out)
    dist.barrier()
    # A captured step holds NCCL's all-reduces: drop the graph before the communicator, or destroying it waits
    del got, cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.destroy_process_group()


def repeat(checkpoint: str, out: str, rounds: int = 3) -> None:
    """bfloat16, compiled graphs: generate ``rounds`` times each with the step's sums pushed (`_pushed_sums`) and
    with every sum one-shot, alternating, on the whole batch and on its last row (two graphs whose landing regions
    overlap, replayed one after the other). Rank 0 saves every run's scores, to be compared bit for bit."""
    from unittest import mock

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16, distributed_config=DistributedConfig(tp_plan="auto"))
    hf_rolling_cache.enable(model, prefill_chunk_size=model.config.sliding_window)
    hf_rolling_cache.use_cuda_graphs(model, compile=True)
    batch = {k: v.to(model.device) for k, v in torch.load(f"{checkpoint}/batch.pt").items()}
    last_row = {k: v[-1:] for k, v in batch.items()}
    runs = {"pushed": [], "one_shot": []}
    for _ in range(rounds):
        for inputs in (batch, last_row):
            for name, pushed in (("pushed", contextlib.nullcontext()),
                                 ("one_shot", mock.patch.object(_all_reduce, "_pushed", lambda *args: False))):
                with pushed:
                    got = model.generate(**inputs, past_key_values=RollingSlidingWindowCache(config=model.config),
                                         max_new_tokens=24, do_sample=False, output_scores=True,
                                         return_dict_in_generate=True, pad_token_id=0)
                runs[name].append([s.float().cpu() for s in got.scores])
    if dist.get_rank() == 0:
        torch.save(dict(runs=runs, pushed=_all_reduce.captured_pushed_sums()), out)
    dist.barrier()
    del got  # (it holds the last cache, and so its captured graph: see `main`)
    gc.collect()
    torch.cuda.synchronize()
    dist.destroy_process_group()


@contextlib.contextmanager
def products_on_shards(model, products: Counter):
    """The compiled step's layers (`CompiledLayers`, dynamo's eager backend) swapped in around the block, our
    product kernel on CPU (Triton's interpreter): counts each kernel call in ``products`` by (weight shape, gated),
    then checks that Transformers' forwards are back, and that each fused shard holds its own storage again."""
    from hf_rolling_cache import _kernels, _narrow_products
    from hf_rolling_cache._compiled import CompiledLayers
    from hf_rolling_cache._tp_products import shard_of

    _kernels._narrow_products.devices = ("cuda", "cpu")
    run = _narrow_products.narrow_linear

    def counted(input, weight, *args, gated=False, **kwargs):
        products[(tuple(weight.shape), gated)] += 1
        return run(input, weight, *args, gated=gated, **kwargs)

    _narrow_products.narrow_linear = counted
    sharded = [m for m in model.modules() if shard_of(m) is not None]
    forwards = [vars(m)["forward"] for m in sharded]
    compiled = CompiledLayers(model, backend="eager")
    groups = list(compiled.groups)
    products["groups"] = len(groups)
    try:
        with compiled.swapped_in():
            yield
    finally:
        _narrow_products.narrow_linear = run
        compiled.release()
    assert [vars(m)["forward"] for m in sharded] == forwards and all(shard_of(m) for m in sharded)
    fused = [part for group in groups for part in group.parts]
    own = [m.weight._local_tensor for m in fused]
    assert own and all(tensor.untyped_storage().nbytes() == tensor.nbytes for tensor in own)


if __name__ == "__main__":
    main(*sys.argv[1:])
