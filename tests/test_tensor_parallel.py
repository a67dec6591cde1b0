"""Tensor parallelism (``tp_plan="auto"`` under torchrun, two GPUs): the rolling cache holds each GPU's half of
the key/value heads and gives one GPU's tokens and logits in fp32, eagerly and with CUDA graphs (the all-reduces
captured with the step). Skipped with fewer than two GPUs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_rolling_cache import RollingSlidingWindowCache
from tests.conftest import model_pair, ragged_batch, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]

WINDOW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Mistral (8 heads, 2 kv heads: one per GPU) saved as users load one, with the batch to generate from,
    and one GPU's answer."""
    folder = tmp_path_factory.mktemp("tp")
    _, model = model_pair(tiny_config(WINDOW, layers=4, heads=8, kv_heads=2, head_dim=64))
    model.config.bos_token_id = model.config.eos_token_id = None
    model.save_pretrained(folder)
    input_ids, attention_mask = ragged_batch([37, 2, 19, 64], seed=3)
    torch.save(dict(input_ids=input_ids, attention_mask=attention_mask), folder / "batch.pt")
    model = model.cuda()
    expected = model.generate(input_ids=input_ids.cuda(), attention_mask=attention_mask.cuda(), max_new_tokens=24,
                              do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                              past_key_values=RollingSlidingWindowCache(config=model.config),
                              prefill_chunk_size=WINDOW)
    return folder, expected


@pytest.mark.parametrize("path", ["eager", "graphs", "compiled"])
def test_tensor_parallel_is_one_gpus_answer(checkpoint, path, tmp_path):
    folder, expected = checkpoint
    out = tmp_path / "got.pt"
    worker = Path(__file__).with_name("tp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                          str(folder), path, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    got = torch.load(out)
    assert got["kv_heads"] == 1  # each GPU holds half of the key/value heads
    assert got["replayed"] == (path != "eager")
    assert torch.equal(got["sequences"], expected.sequences.cpu())
    for ours, theirs in zip(got["scores"], expected.scores):
        torch.testing.assert_close(ours, theirs.cpu(), rtol=0, atol=1e-4)
