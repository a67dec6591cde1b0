"""Started by tests/test_tensor_parallel.py under ``torchrun --nproc_per_node 2`` (two GPUs, or the CPU over gloo):
loads a checkpoint with Transformers' tensor parallelism (``DistributedConfig(tp_plan="auto")``, each process
holding half of every layer's heads and MLP), generates with the rolling cache, and rank 0 saves the tokens and
scores.

    torchrun --nproc_per_node 2 tests/tp_worker.py CHECKPOINT eager|graphs|compiled OUT.pt
"""

import gc
import sys

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
    if path != "eager":
        hf_rolling_cache.use_cuda_graphs(model, compile=path == "compiled")
    batch = torch.load(f"{checkpoint}/batch.pt")
    cache = RollingSlidingWindowCache(config=model.config)
    got = model.generate(**{k: v.to(model.device) for k, v in batch.items()}, past_key_values=cache,
                         max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0)
    replayed = getattr(cache.decode_graph, "segments", None) is not None  # a captured graph, not eager steps
    one_shot = _all_reduce.captured_one_shots()  # all-reduces recorded one-shot over symmetric memory
    if dist.get_rank() == 0:
        torch.save(dict(sequences=got.sequences.cpu(), scores=[s.cpu() for s in got.scores], replayed=replayed,
                        one_shot=one_shot, kv_heads=cache.layers[0].keys.shape[1]), out)
    dist.barrier()
    # A captured step holds NCCL's all-reduces: drop the graph before the communicator, or destroying it waits
    del got, cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
