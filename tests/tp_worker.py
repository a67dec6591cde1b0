"""Started by tests/test_tensor_parallel.py under ``torchrun --nproc_per_node 2`` (two GPUs, or the CPU over gloo):
loads a checkpoint with Transformers' tensor parallelism (``DistributedConfig(tp_plan="auto")``, each process
holding half of every layer's heads and MLP), generates with the rolling cache, and rank 0 saves the tokens and
scores.

    torchrun --nproc_per_node 2 tests/tp_worker.py CHECKPOINT eager|graphs|compiled|products OUT.pt

``products`` (CPU): the whole generate through the compiled step's forwards (dynamo's eager backend), each shard's
product by our kernel in Triton's interpreter; rank 0 also saves which products the kernel made.
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
from hf_rolling_cache import RollingSlidingWindowCache, _all_reduce


def main(checkpoint: str, path: str, out: str) -> None:
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
    if dist.get_rank() == 0:
        torch.save(dict(sequences=got.sequences.cpu(), scores=[s.cpu() for s in got.scores], replayed=replayed,
                        one_shot=one_shot, kv_heads=cache.layers[0].keys.shape[1], products=dict(products)), out)
    dist.barrier()
    # A captured step holds NCCL's all-reduces: drop the graph before the communicator, or destroying it waits
    del got, cache
    gc.collect()
    if torch.cuda.is_available():
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
    assert fused and all(m.weight._local_tensor.untyped_storage().nbytes() == m.weight._local_tensor.nbytes for m in fused)


if __name__ == "__main__":
    main(*sys.argv[1:])
