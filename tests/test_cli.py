"""`hf-rolling-cache`: estimate against the seeds' figures, the walkthrough against the seed, bench, bad input."""

import json
import re
import subprocess
import sys

import pytest

from hf_rolling_cache import estimate
from hf_rolling_cache.cli import main
from tests.test_plan import SEED_DECODE_1, SEED_ITERATION_1, SEED_ITERATION_2


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_estimate_reproduces_the_opt_30b_figure(capsys):
    out = run(capsys, "estimate", "--preset", "opt-30b", "--batch", "128", "--seq", "1024", "--dtype", "fp16")
    # seed 001: 2 x 2 bytes x 48 layers x d_model 7168 x 1024 tokens x batch 128 = "180G"
    assert 2 * 2 * 48 * 7168 * 1024 * 128 == 180_388_626_432
    assert "180.39 GB (168.00 GiB)" in out
    assert "no sliding window; pass --window" in out


def test_flops_saved_matches_seed_002():
    flops = estimate.flops_saved(tokens=10_000, kv_heads=8, dim=4096, layers=32)
    # the seed prints 4.294e+17 for 10000*10000*8*4096*4096*32 (= 4.295e17, truncated); the exact T (T-1) sum is
    # 1e-4 smaller, so both agree with the seed's figure to its printed precision (0.1%)
    assert flops == pytest.approx(4.294e17, rel=1e-3)
    assert flops == 10_000 * 9_999 * 8 * 4096 * 4096 * 32


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


def test_bench_rows_and_flat_rolling_memory(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = run(capsys, "bench", "--lengths", "8,24", "--window", "8", "--batch", "2", "--png", str(tmp_path / "b.png"))
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+(no|transformers|rolling)", line)]
    assert len(rows) == 6
    rolling = [int(r[-2].replace(",", "")) for r in rows if r[1] == "rolling"]
    assert rolling == [2 * 4 * 2 * 8 * 2 * 32 * 4] * 2  # K,V x 4 layers x B x W x 2 kv heads x 32 x fp32
    assert all(int(r[-2].replace(",", "")) == 0 for r in rows if r[1] == "no")
    assert (tmp_path / "b.png").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["estimate", "--preset", "llama-9000"], "invalid choice: 'llama-9000'"),
        (["estimate", "--preset", "mistral-7b", "--window", "0"], "must be a positive integer"),
        (["walkthrough", "--seqlens", "4,,x"], "like 4,1,3"),
        (["walkthrough", "--seqlens", "4,0"], "lengths must be positive"),
        (["walkthrough", "--window", "-1"], "must be a positive integer"),
        (["estimate", "--config", "/nonexistent"], "No config.json"),
    ],
)
def test_bad_arguments(capsys, argv, message):
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
