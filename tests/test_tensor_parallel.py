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
    out = tmp_path / "got.pt"
    worker = Path(__file__).with_name("tp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent.parent), os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # Transformers then runs tensor parallelism over gloo on the CPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
               str(folder), path, str(out)]  # --standalone: a free port of its own
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    got = torch.load(out)
    assert got["kv_heads"] == 1  # each process holds half of the key/value heads
    assert got["replayed"] == (path in ("graphs", "compiled"))
    # every captured step's all-reduces (two a layer) summed over symmetric memory (_all_reduce), none eagerly
    assert got["one_shot"] >= 2 * 4 if path in ("graphs", "compiled") else got["one_shot"] == 0
    if path == "products":
        assert got["products"] == shard_products(model.config, steps=23)
    assert torch.equal(got["sequences"], expected.sequences.cpu())
    for ours, theirs in zip(got["scores"], expected.scores):
        torch.testing.assert_close(ours, theirs.cpu(), rtol=0, atol=1e-4)
