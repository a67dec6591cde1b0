"""Data-parallel batched generation with Accelerate and the rolling cache.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_generate.py --out outputs.json
    python examples/accelerate_generate.py --out outputs.json          # one process, same outputs

(`--multi_gpu` starts the processes with torchrun; on a machine without CUDA they talk over gloo on the CPU.)

Every process builds the same model (a seeded tiny random Mistral), takes its share
of the prompts, generates with `hf_rolling_cache.enable`, and the main process writes the gathered outputs.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

import hf_rolling_cache
from hf_rolling_cache.tools.walkthrough import tiny_model


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=generator).tolist()
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def left_padded(batch: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(batch):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the gathered outputs (written by the main process)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=3)
    args = parser.parse_args()

    state = PartialState(cpu=not torch.cuda.is_available())  # without CUDA: processes on the CPU (gloo)
    model = tiny_model(args.window, seed=0).to(state.device)  # identical weights in every process
    hf_rolling_cache.enable(model)
    all_prompts = list(enumerate(prompts(args.prompts, model.config.vocab_size)))

    results = []
    with state.split_between_processes(all_prompts) as mine:
        for start in range(0, len(mine), args.batch_size):
            batch = mine[start : start + args.batch_size]
            input_ids, attention_mask = left_padded([p for _, p in batch], state.device)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=args.max_new_tokens,
                do_sample=False, pad_token_id=0,
            )
            for (index, _), row in zip(batch, output[:, input_ids.shape[1] :].tolist()):
                results.append({"prompt": index, "tokens": row})
    gathered = sorted(gather_object(results), key=lambda r: r["prompt"])
    if state.is_main_process:
        with open(args.out, "w") as handle:
            json.dump({"processes": state.num_processes, "outputs": gathered}, handle)
    state.wait_for_everyone()
    state.destroy_process_group()  # a process group left to the interpreter's exit can abort a rank (SIGABRT)


if __name__ == "__main__":
    main()
