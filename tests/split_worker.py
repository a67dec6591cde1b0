"""Started by tests/test_gpu_hybrid.py: a tiny Mistral split over two GPUs (Accelerate's dispatch) generates the
ragged batch ``repeats`` times, eagerly or with CUDA graphs, and saves every answer. The test runs it with and
without ``CUDA_LAUNCH_BLOCKING=1``: an ordering fault between the GPUs can hide when every launch waits.

    python tests/split_worker.py float32|bfloat16 eager|graphs REPEATS OUT.pt
"""

import copy
import sys
from pathlib import Path

import torch
from accelerate import dispatch_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_rolling_cache  # noqa: E402
from hf_rolling_cache import RollingSlidingWindowCache  # noqa: E402
from tests.conftest import model_pair, ragged_batch, tiny_config  # noqa: E402

WINDOW = 8
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
         "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}


def main(dtype: str, path: str, repeats: str, out: str) -> None:
    _, rolling = model_pair(tiny_config(WINDOW, layers=4, heads=8, kv_heads=2, head_dim=64))
    split = dispatch_model(copy.deepcopy(rolling).to(getattr(torch, dtype)), device_map=SPLIT)
    if path == "graphs":
        hf_rolling_cache.use_cuda_graphs(split)
    input_ids, attention_mask = (t.cuda() for t in ragged_batch([37, 2, 19, 64], seed=3))
    answers = []
    for _ in range(int(repeats)):
        got = split.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3 * WINDOW,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                             past_key_values=RollingSlidingWindowCache(config=split.config),
                             prefill_chunk_size=WINDOW)
        answers.append(dict(sequences=got.sequences.cpu(), scores=[s.float().cpu() for s in got.scores]))
    torch.save(answers, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
