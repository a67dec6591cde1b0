"""Tensor parallelism (Transformers' ``tp_plan="auto"`` under torchrun, two processes): the rolling cache holds each
process's half of the key/value heads and gives one process's tokens and logits in fp32. On CPU (gloo, everywhere)
eagerly; on two GPUs (NCCL) eagerly and with CUDA graphs, compiled or not (the all-reduces captured with the step)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, ragged_batch, tiny_config

WINDOW = 8
TWO_GPUS = torch.cuda.device_count() >= 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Mistral (8 heads, 2 kv heads: one per process) saved as users load one, with the batch to generate
    from."""
    folder = tmp_path_factory.mktemp("tp")
    _, model = model_pair(tiny_config(WINDOW, layers=4, heads=8, kv_heads=2, head_dim=64))
    model.config.bos_token_id = model.config.eos_token_id = None
    model.save_pretrained(folder)
    input_ids, attention_mask = ragged_batch([37, 2, 19, 64], seed=3)
    torch.save(dict(input_ids=input_ids, attention_mask=attention_mask), folder / "batch.pt")
    return folder, model, input_ids, attention_mask


def one_process(model, input_ids, attention_mask, device):
    model = copy.deepcopy(model).to(device)
    return model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=24,
                          do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                          past_key_values=RollingSlidingWindowCache(config=model.config), prefill_chunk_size=WINDOW)


def two_processes(folder, path: str, device: str, tmp_path) -> dict:
    """``tp_worker.py`` under torchrun (two processes: two GPUs, or the CPU over gloo): rank 0's answer."""
    out = tmp_path / "got.pt"
    worker = Path(__file__).with_name("tp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent.parent), os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # Transformers then runs tensor parallelism over gloo on the CPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
               str(folder), path, str(out)]  # --standalone: a free port of its own
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    return torch.load(out)


def shard_products(config, steps: int) -> dict:
    """What our kernel multiplies on one of two processes in ``steps`` decode steps (4 rows each; the prefill's
    longer inputs go to ``F.linear``), by (weight shape, gated): each layer's column-parallel shards fused (half the
    q, k and v rows, computed by each of the three parts: without inductor nothing merges them; half the gate and
    up rows, with the activation), its row-parallel shards (half the o and down columns) alone; the head
    (gathered, not a shard) stays Transformers'."""
    hidden, head_dim, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim // 2
    calls = steps * layers
    return {"groups": 2 * layers, ((qkv, hidden), False): 3 * calls, ((config.intermediate_size, hidden), True): calls,
            ((hidden, config.num_attention_heads * head_dim // 2), False): calls,
            ((hidden, config.intermediate_size // 2), False): calls}


@pytest.mark.parametrize("device,path", [
    ("cpu", "eager"),
    pytest.param("cpu", "products", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")),
    pytest.param("cuda", "eager", marks=pytest.mark.gpu),
    pytest.param("cuda", "graphs", marks=pytest.mark.gpu),
    pytest.param("cuda", "compiled", marks=pytest.mark.gpu),
])
def test_tensor_parallel_is_one_process_answer(checkpoint, device, path, tmp_path):
    if device == "cuda" and not TWO_GPUS:
        pytest.skip("needs two GPUs")
    folder, model, input_ids, attention_mask = checkpoint
    expected = one_process(model, input_ids, attention_mask, device)
    got = two_processes(folder, path, device, tmp_path)
    assert got["kv_heads"] == 1  # each process holds half of the key/value heads
    assert got["replayed"] == (path in ("graphs", "compiled"))
    # every captured step's all-reduces (two a layer) summed over symmetric memory (_all_reduce), none eagerly
    assert got["one_shot"] >= 2 * 4 if path in ("graphs", "compiled") else got["one_shot"] == 0
    # compiled: each step's row-parallel products by our kernel, every sum but the step's first pushed (_pushed_sums)
    assert got["pushed"] >= 2 * 4 - 1 if path == "compiled" else got["pushed"] == 0
    if path == "products":
        assert got["products"] == shard_products(model.config, steps=23)
    assert torch.equal(got["sequences"], expected.sequences.cpu())
    for ours, theirs in zip(got["scores"], expected.scores):
        torch.testing.assert_close(ours, theirs.cpu(), rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
def test_pushed_sums_give_the_one_shot_sums_bits_run_after_run(checkpoint, tmp_path):
    """bfloat16, where a landed part read too early or a region cleared too late would show: generations with the
    step's sums pushed into the other GPU's landing buffer (`_pushed_sums`) and with PyTorch's one-shot kernel,
    alternating, on two batch sizes (graphs whose landing regions overlap) give the same scores to the last bit,
    every time. Both sum the same two bfloat16 parts once in float32."""
    got = two_processes(checkpoint[0], "repeat", "cuda", tmp_path)
    pushed, one_shot = got["runs"]["pushed"], got["runs"]["one_shot"]
    assert got["pushed"] >= 2 * (2 * 4 - 1)  # both graphs captured with pushed sums
    for first, second in zip(pushed, one_shot):
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    for index, later in enumerate(pushed[2:], start=2):  # runs alternate the batch and its last row
        assert all(torch.equal(a, b) for a, b in zip(later, pushed[index % 2]))


@pytest.mark.parametrize("device,path", [
    pytest.param("cpu", "products", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")),
    pytest.param("cuda", "compiled", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("family", ["starcoder2", "qwen2"])
def test_shards_with_biases_and_uneven_widths_multiply_as_transformers_does(family, device, path, tmp_path):
    """Starcoder2 (a bias on every product, an MLP of two plain products: a column-parallel shard alone, and its
    row-parallel bias added once after the sum) and Qwen2 (q/k/v biases, a gated MLP), random biases, an
    intermediate size of 257, which the two processes split 129/128 (our kernel takes the 128-column down shard
    only: that sum stays Transformers' on both ranks, `_tp_products.agreed`), all through the compiled step's
    forwards on the CPU, and captured on two GPUs (where a sum one rank pushed and the other did not would hang):
    one process's tokens and logits."""
    if device == "cuda" and not TWO_GPUS:
        pytest.skip("needs two GPUs")
    from transformers import Qwen2Config, Qwen2ForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

    sizes = dict(vocab_size=97, hidden_size=128, intermediate_size=257, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, sliding_window=WINDOW, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if family == "starcoder2":
        config, model_class = Starcoder2Config(**sizes, head_dim=16, use_bias=True), Starcoder2ForCausalLM
    else:  # every layer sliding
        config, model_class = Qwen2Config(**sizes, use_sliding_window=True, max_window_layers=0), Qwen2ForCausalLM
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # (Transformers starts every bias at zero: it would test nothing)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.set_attn_implementation("rolling_xformers")
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = ragged_batch([37, 2, 19, 64], seed=3)
    torch.save(dict(input_ids=input_ids, attention_mask=attention_mask), tmp_path / "batch.pt")
    expected = one_process(model, input_ids, attention_mask, device)
    got = two_processes(tmp_path, path, device, tmp_path)
    assert got["products"] if path == "products" else got["pushed"] > 0  # our kernel multiplied shards
    assert torch.equal(got["sequences"], expected.sequences.cpu())
    for ours, theirs in zip(got["scores"], expected.scores):
        torch.testing.assert_close(ours, theirs.cpu(), rtol=0, atol=1e-4)
