"""`hf-rolling-cache`: estimate against the seeds' figures, the walkthrough against the seed, bench, bad input."""

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, GPT2Config, MistralConfig, MistralForCausalLM

from hf_rolling_cache.tools import estimate
from hf_rolling_cache.tools.bench import bench_config
from hf_rolling_cache.tools.cli import main
from hf_rolling_cache.tools.memory import cache_bytes
from tests.conftest import SEED_DECODE_1, SEED_ITERATION_1, SEED_ITERATION_2


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_estimate_reproduces_the_opt_30b_figure(capsys):
    out = run(capsys, "estimate", "--preset", "opt-30b", "--batch", "128", "--seq", "1024", "--dtype", "fp16")
    # seed 001: 2 x 2 bytes x 48 layers x d_model 7168 x 1024 tokens x batch 128 = "180G"
    assert 2 * 2 * 48 * 7168 * 1024 * 128 == 180_388_626_432
    assert "180.39 GB (168.00 GiB)" in out
    assert "GB = 10^9 bytes, GiB = 2^30 bytes" in out
    assert "no sliding window; pass --window" in out
    # OPT-30B attends to every token: a window is the user's choice, and the output says what it changes
    windowed = run(capsys, "estimate", "--preset", "opt-30b", "--batch", "128", "--seq", "1024", "--window", "512")
    assert f"rolling cache, window 512: {2 * 2 * 48 * 7168 * 512 * 128 / 1e9:.2f} GB" in windowed
    assert "the model attends to every token; with a 512-token window it computes something else" in windowed


def test_flops_saved_matches_seed_002():
    flops = estimate.flops_saved(tokens=10_000, kv_heads=8, dim=4096, layers=32)
    # the seed prints 4.294e+17 for 10000*10000*8*4096*4096*32 (= 4.295e17, truncated); the exact T (T-1) sum is
    # 1e-4 smaller, so both agree with the seed's figure to its printed precision (0.1%)
    assert flops == pytest.approx(4.294e17, rel=1e-3)
    assert flops == 10_000 * 9_999 * 8 * 4096 * 4096 * 32


def test_estimate_prints_the_seed_002_time_on_an_a100(capsys):
    out = run(capsys, "estimate", "--preset", "mistral-7b")
    # seed 002: 4.294e+17 FLOPs at 312e+12 FLOP/s, "we might save round 23 minutes"
    minutes = float(re.search(r"about ([\d.]+) minutes of an A100", out).group(1))
    assert minutes == pytest.approx(23, abs=0.5)


def test_estimate_counts_grouped_query_heads_and_the_window(capsys, tmp_path):
    config = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
              "sliding_window": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run(capsys, "estimate", "--config", str(tmp_path), "--batch", "8", "--seq", "32768", "--dtype", "bf16")
    assert f"{2 * 2 * 32 * 8 * 128 * 32768 * 8 / 2**30:.2f} GiB" in out  # 8 kv heads x 128, not d_model 4096
    assert f"{2 * 2 * 32 * 8 * 128 * 4096 * 8 / 2**30:.2f} GiB" in out  # the ring: 4096 slots at any length
    assert "4.2945e+17" in out
    preset = run(capsys, "estimate", "--preset", "mistral-7b", "--batch", "8", "--seq", "32768", "--dtype", "bf16")
    assert preset.split(":", 1)[1] == out.split(":", 1)[1]


def test_estimate_model_config_reads_a_local_folder(capsys, tmp_path):
    MistralConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                  sliding_window=4096).save_pretrained(tmp_path / "mistral")
    out = run(capsys, "estimate", "--model-config", str(tmp_path / "mistral"), "--seq", "1024")
    preset = run(capsys, "estimate", "--preset", "mistral-7b", "--seq", "1024")
    assert out.split(":", 1)[1] == preset.split(":", 1)[1]
    assert "more than the full cache at 1024 tokens" in out  # the 4096-slot ring is allocated at the first token
    # GPT-2 names its fields n_layer, n_head, n_embd; the config object's aliases resolve them
    GPT2Config(n_layer=6, n_head=4, n_embd=256).save_pretrained(tmp_path / "gpt2")
    gpt2 = run(capsys, "estimate", "--model-config", str(tmp_path / "gpt2"), "--seq", "100")
    assert "6 layers, 4 kv heads x head_dim 64 = 256 numbers" in gpt2
    assert f"{2 * 2 * 6 * 256 * 100 / 2**30:.2f} GiB" in gpt2


def test_estimate_ignores_a_window_the_config_turns_off(capsys, tmp_path):
    # Qwen2-style config.json: a sliding_window value that use_sliding_window = false leaves unused
    config = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584,
              "sliding_window": 131072, "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run(capsys, "estimate", "--config", str(tmp_path / "config.json"))
    assert "no sliding window" in out and "rolling cache, window" not in out


def test_estimate_sizes_a_hybrid_model_rings_flat_global_layers_growing(capsys, tmp_path):
    # Gemma-3-style: 6 layers, 5 sliding (window 512) to 1 global, 1 kv head of 256; bf16, batch 2
    config = {"num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1, "hidden_size": 640,
              "head_dim": 256, "sliding_window": 512, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run(capsys, "estimate", "--config", str(tmp_path / "config.json"), "--batch", "2", "--seq", "4096",
              "--dtype", "bf16")
    per_token = 2 * 2 * 256 * 2  # K and V, bf16, 256 numbers, batch 2
    rings, globals_ = 5 * 512 * per_token, 1 * 4096 * per_token
    assert f"{(rings + globals_) / 1e9:,.2f} GB" in out.split("rolling cache, window 512:")[1].splitlines()[0]
    assert f"5 sliding layers x 512 slots: {rings / 1e9:,.2f} GB" in out
    assert f"1 global layers x 4096 tokens: {globals_ / 1e9:,.2f} GB" in out


def test_walkthrough_prints_the_seed(capsys):
    out = run(capsys, "walkthrough", "--seqlens", "4,1,3", "--window", "3", "--chunk", "2", "--new", "5")
    steps = out.split("\n\n")[1:]
    assert [s.splitlines()[0] for s in steps[:3]] == [
        "iteration 1: prefill", "iteration 2: subsequent prefill", "decode 1: decode"]

    def grid(step):
        return [[int(v) for v in re.findall(r"\d", line)] for line in step.splitlines() if line.startswith("    [")]

    assert grid(steps[0]) == SEED_ITERATION_1 and "q_seqlen  = [2, 1, 2]" in steps[0]
    assert grid(steps[1]) == SEED_ITERATION_2 and "kv_seqlen = [4, 1, 3]" in steps[1]
    assert grid(steps[2]) == SEED_DECODE_1 and "kv_seqlen = [3, 2, 3]" in steps[2]
    # the seed: decode 1 writes positions 4, 1, 3 into slots 1, 1, 0 (rolling positions [0, 1, 2, 0, 1, 2, ...])
    assert "sequence 0 ring slots: [3, 4, 2]" in steps[2]
    assert "sequence 1 ring slots: [0, 1, -]" in steps[2]
    assert "sequence 2 ring slots: [3, 1, 2]" in steps[2]
    assert len(steps) == 2 + 5


def test_walkthrough_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "walk.png"
    run(capsys, "walkthrough", "--png", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_bench_rows_and_memory(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    batch, window, prompt, lengths = 2, 8, 16, (8, 24)
    out = run(capsys, "bench", "--lengths", ",".join(map(str, lengths)), "--window", str(window), "--batch",
              str(batch), "--prompt", str(prompt), "--png", str(tmp_path / "b.png"))
    rows = re.findall(r"^\s+(\d+)\s+(no cache|transformers cache|rolling cache)\s+[\d.]+\s+([\d,]+) B\s+(yes|NO)$",
                      out, re.MULTILINE)
    assert [(int(n), path) for n, path, _, _ in rows] == [
        (n, path) for n in lengths for path in ("no cache", "transformers cache", "rolling cache")]
    held = {(int(n), path): int(b.replace(",", "")) for n, path, b, _ in rows}
    token_bytes = 2 * 4 * 2 * 32 * 4  # K and V x 4 layers x 2 kv heads x 32 x fp32, per token and sequence
    for n in lengths:
        assert held[n, "no cache"] == 0
        assert held[n, "rolling cache"] == batch * window * token_bytes  # W slots from the start, at any length
        # Transformers' sliding layer keeps W-1 tokens visible, sliced from the W-token tensor of the last decode
        # step: that tensor stays alive, so it holds W tokens too, also bounded
        assert held[n, "transformers cache"] == batch * window * token_bytes
    assert all(same == "yes" for *_, same in rows)  # greedy: every path generates what no cache does
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"

    # the computed full-cache line, against a real DynamicCache on the same model without a window
    full = [int(b.replace(",", "")) for b in re.findall(r"([\d,]+) B at \d+", out.split("would hold:")[1])]
    config = bench_config(window)
    config.sliding_window = None
    model = MistralForCausalLM(config).eval()
    ids = torch.ones(batch, prompt, dtype=torch.long)
    for n, expected in zip(lengths, full):
        cache = DynamicCache(config=config)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, past_key_values=cache, pad_token_id=0)
        assert cache_bytes(cache) == expected


@pytest.mark.parametrize(
    "argv,message",
    [
        (["estimate", "--preset", "llama-9000"], "invalid choice: 'llama-9000'"),
        (["estimate", "--preset", "mistral-7b", "--window", "0"], "must be a positive integer"),
        (["walkthrough", "--seqlens", "4,,x"], "like 4,1,3"),
        (["walkthrough", "--seqlens", "4,0"], "lengths must be positive"),
        (["walkthrough", "--window", "-1"], "must be a positive integer"),
        (["estimate", "--config", "/nonexistent"], "No config.json"),
        (["estimate", "--config", "{bad_json}"], "is not valid JSON"),
        (["estimate", "--model-config", "/nonexistent/model"], "reads local files only (no download)"),
        (["estimate", "--model-config", "{empty_folder}"], "holds no config.json"),
        (["bench", "--lengths", "8,-1"], "lengths must be positive"),
    ],
)
def test_bad_arguments(capsys, tmp_path, argv, message):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.format(bad_json=tmp_path / "bad.json", empty_folder=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["estimate", "walkthrough", "bench"])
def test_help_for_each_subcommand(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"hf-rolling-cache {command}" in capsys.readouterr().out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "hf_rolling_cache", "--help"], capture_output=True, text=True,
                            check=True)
    assert "estimate" in result.stdout and "walkthrough" in result.stdout and "bench" in result.stdout


def test_version_and_help_without_a_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("hf-rolling-cache 0.1.0")
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "estimate" in out and "walkthrough" in out and "bench" in out
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    assert "(default: 10000)" in capsys.readouterr().out  # --tokens; every option shows its default
