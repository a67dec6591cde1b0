"""Parity at full size on a GPU, in fp32: the rolling cache (CUDA graphs + compiled layers) against Transformers'
eager path on the same weights, for a hybrid model's real shape.

    python benchmarks/gpu_parity.py --shape gemma3-12b     # 48 layers, 5 sliding (W=1024) : 1 global
    python benchmarks/gpu_parity.py --shape gpt-oss        # sinks, W=128, alternating, MoE (8 layers)

Random fp32 weights, a ragged left-padded batch whose longest prompt is past the window, greedy. Prints whether the
tokens are identical and the largest logit difference relative to the logits' scale.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GptOssConfig, GptOssForCausalLM

import hf_rolling_cache
from gpu_bench import Gemma3ForCausalLM, gemma3_12b_config


def build(shape: str):
    if shape == "gemma3-12b":
        config, model_class = gemma3_12b_config(), Gemma3ForCausalLM
    else:
        config = GptOssConfig(num_hidden_layers=8, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                              num_key_value_heads=8, head_dim=64, num_local_experts=8, num_experts_per_tok=4,
                              sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 4)
        model_class = GptOssForCausalLM
    config.bos_token_id = config.eos_token_id = None
    config.pad_token_id = 0
    with torch.device("cuda"):
        model = model_class(config).eval()
    if shape == "gpt-oss":
        with torch.no_grad():  # GPT-OSS initializes its sinks at zero: make them matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0, 1)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["gemma3-12b", "gpt-oss"], default="gemma3-12b")
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.shape)
    window = model.config.sliding_window
    lengths = [window + window // 2, window // 4, window - 3]
    width = max(lengths)
    input_ids = torch.randint(1, 1000, (len(lengths), width), device="cuda")
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        attention_mask[row, width - n :] = 1
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=args.new, do_sample=False,
                   output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    model.set_attn_implementation("eager")
    start = time.perf_counter()
    expected = model.generate(**options)
    reference_s = time.perf_counter() - start
    hf_rolling_cache.enable(model)
    hf_rolling_cache.use_cuda_graphs(model, compile=True)
    start = time.perf_counter()
    got = model.generate(**options)
    rolling_s = time.perf_counter() - start
    scale = max(s.abs().max().item() for s in expected.scores)
    worst = max((a - b).abs().max().item() for a, b in zip(got.scores, expected.scores))
    print(f"{args.shape}: {torch.cuda.get_device_name()}, fp32, window {window}, prompts {lengths}, {args.new} new "
          f"tokens; tokens identical: {torch.equal(got.sequences, expected.sequences)}; max |logit diff| "
          f"{worst:.2e} (logit scale {scale:.2f}, relative {worst / scale:.2e}); Transformers eager {reference_s:.1f} s, "
          f"rolling + compiled graphs {rolling_s:.1f} s (warm-up included)", flush=True)


if __name__ == "__main__":
    main()
