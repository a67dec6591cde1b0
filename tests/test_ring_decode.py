"""The Triton decode kernels (`_ring_decode`): the step's write and the attention over each row's filled slots,
against the separate write (`write_tokens`) and SDPA (`attend_ring`), and through generate against Transformers.

On CUDA they run compiled; on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest)."""

import copy
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import hf_rolling_cache  # noqa: E402
from hf_rolling_cache import RollingSlidingWindowCache, _kernels, _ring_decode  # noqa: E402
from hf_rolling_cache._kernels import attend_ring  # noqa: E402
from hf_rolling_cache._layers import write_tokens  # noqa: E402
from tests.conftest import ragged_batch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    """Chunks of 64 slots (the launch rule's minimum is 256): the small rings here split too, so the combining
    kernel and chunks with no filled slot run."""
    monkeypatch.setitem(_ring_decode._CONFIG, "min_chunk", 64)


def separate_write_then_sdpa(query, new_keys, new_values, slot_keys, slot_values, rows, keep, kv_seqlens, span, scale):
    """What decoding does without the kernels: `write_tokens`, then SDPA over the first ``span`` slots with each
    row's first ``kv_seqlens[b]`` unmasked."""
    write_tokens(slot_keys.flatten(0, 1), slot_values.flatten(0, 1), new_keys, new_values, rows, keep)
    batch = query.shape[0]
    mask = (torch.arange(span, device=query.device)[None, :] < kv_seqlens[:, None]).view(batch, 1, 1, span)
    return attend_ring(query, slot_keys[:, :span], slot_values[:, :span], mask, scale)


CASES = {  # batch, query heads, kv heads, head dim, value dim, capacity, kv_seqlens, keep, key span
    "ring filling, a padded row": (3, 8, 2, 64, 64, 40, [40, 7, 1], [True, False, True], None),
    "one row, chunks combined": (1, 8, 2, 64, 64, 200, [200], None, None),
    "empty chunks": (2, 8, 2, 64, 64, 200, [130, 3], [True, True], None),
    "global layer, narrow values": (2, 6, 2, 48, 32, 300, [150, 20], None, 150),
    "no grouping": (2, 4, 4, 16, 16, 70, [70, 33], [False, True], None),
    "wide heads": (2, 4, 1, 256, 256, 100, [100, 64], None, None),
    "three heads a group, a full ring written mid-way": (2, 6, 2, 32, 32, 200, [200, 200], [True, True], None),
    "a padded row on an unfilled slot": (2, 8, 2, 64, 64, 200, [200, 1], [True, False], None),
}
WRITTEN = {  # the slot each row writes, where it is not the last one it attends over ((kv_seqlen - 1) % capacity)
    "three heads a group, a full ring written mid-way": [130, 3],
    "a padded row on an unfilled slot": [70, 1],  # row 1: a column of padding, its slot one past what it holds
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_write_and_attend_as_the_write_then_sdpa(case, dtype):
    batch, query_heads, kv_heads, head_dim, value_dim, capacity, kv_seqlens, keep, span = CASES[case]
    span = span or capacity
    generator = torch.Generator().manual_seed(sum(kv_seqlens))

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    query = randn(batch, query_heads, 1, head_dim)
    new_keys, new_values = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, value_dim)
    slot_keys, slot_values = randn(batch, capacity, kv_heads, head_dim), randn(batch, capacity, kv_heads, value_dim)
    lengths = torch.tensor(kv_seqlens, dtype=torch.int32, device=DEVICE)
    written = WRITTEN.get(case, [(n - 1) % capacity for n in kv_seqlens])
    rows = torch.tensor([b * capacity + slot for b, slot in enumerate(written)], device=DEVICE)
    keep = None if keep is None else torch.tensor(keep, device=DEVICE).view(-1, 1, 1)
    expected_keys, expected_values = slot_keys.clone(), slot_values.clone()

    got = _ring_decode.ring_attention(query, new_keys, new_values, slot_keys, slot_values, rows, keep, lengths, span, 0.3)
    expected = separate_write_then_sdpa(query, new_keys, new_values, expected_keys, expected_values, rows, keep,
                                        lengths, span, 0.3)

    assert torch.equal(slot_keys, expected_keys) and torch.equal(slot_values, expected_values)  # the write, exactly
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3  # float16: the probabilities are rounded before P @ V
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs the compiled kernels (CUDA)")
def test_kernels_in_bfloat16_on_the_gpu():
    batch, capacity = 8, 4096
    query = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    new_keys, new_values = (torch.randn(batch, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slot_keys, slot_values = (torch.randn(batch, capacity, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([capacity, 5, 4000, 1, 64, 65, 2048, capacity], dtype=torch.int32, device="cuda")
    rows = torch.arange(batch, device="cuda") * capacity + (lengths - 1).long() % capacity
    expected_keys, expected_values = slot_keys.clone(), slot_values.clone()
    got = _ring_decode.ring_attention(query, new_keys, new_values, slot_keys, slot_values, rows, None, lengths,
                                      capacity, 0.088)
    expected = separate_write_then_sdpa(query, new_keys, new_values, expected_keys, expected_values, rows, None,
                                        lengths, capacity, 0.088)
    assert torch.equal(slot_keys, expected_keys) and torch.equal(slot_values, expected_values)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)


@pytest.mark.parametrize("batch,kv_heads,span", [(1, 8, 4096), (8, 8, 4096), (32, 8, 4096), (3, 2, 40), (1, 1, 65)])
def test_chunks_cover_every_slot_once(batch, kv_heads, span):
    block = _ring_decode.block_slots(128)
    splits, chunk = _ring_decode.split_count(batch, kv_heads, span, block, DEVICE)
    assert chunk % block == 0 and (splits - 1) * chunk < span <= splits * chunk  # no chunk empty for a full row
    assert splits == 1 or chunk >= _ring_decode._CONFIG["min_chunk"]
    assert splits <= _ring_decode._CONFIG["max_splits"]


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """The kernels on every device generate runs on here (CPU too), each call's batch size recorded."""
    calls: list[int] = []
    run = _ring_decode.ring_attention

    def counted(query, *args):
        calls.append(query.shape[0])
        return run(query, *args)

    if DEVICE.type == "cpu":
        monkeypatch.setattr(_kernels._ring_decode, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(_ring_decode, "ring_attention", counted)
    return calls


@pytest.mark.parametrize("on_device", [False, True], ids=["host-planned", "device-planned"])
def test_generate_with_the_kernels_gives_transformers_tokens(kernel_calls, on_device):
    from tests.test_generation import models, reference_run

    window, lengths = 4, (37, 2, 19, 64)
    expected = reference_run(window, lengths)
    _, rolling = models(window)
    input_ids, attention_mask = ragged_batch(list(lengths), seed=len(lengths))
    cache = RollingSlidingWindowCache(config=rolling.config)
    cache.decode_on_device = on_device
    got = rolling.to(DEVICE).generate(
        input_ids=input_ids.to(DEVICE), attention_mask=attention_mask.to(DEVICE), past_key_values=cache,
        max_new_tokens=3 * window + 2, do_sample=False, output_scores=True, return_dict_in_generate=True,
        pad_token_id=0,
    )
    rolling.cpu()
    assert torch.equal(got.sequences.cpu(), expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=0, atol=1e-4)
    assert len(kernel_calls) == rolling.config.num_hidden_layers * (3 * window + 1)  # every decode step, every layer


@pytest.mark.parametrize("name", ["gemma3", "mimo_v2_flash"])
def test_hybrid_models_decode_their_global_layers_with_the_kernels(kernel_calls, name):
    """Global layers (every token, a growing buffer) decode through the kernels too: Gemma 3's, and MiMo's whose
    values are narrower than its keys (its sliding layers have sinks: they keep the float32 products)."""
    from tests.test_families import PROMPTS, assert_same, reference, reference_run

    model = copy.deepcopy(reference(name)).to(DEVICE)
    hf_rolling_cache.enable(model)
    input_ids, attention_mask = ragged_batch(PROMPTS, seed=3)
    got = model.generate(
        input_ids=input_ids.to(DEVICE), attention_mask=attention_mask.to(DEVICE), max_new_tokens=12,
        do_sample=False, past_key_values=RollingSlidingWindowCache(config=model.config), output_scores=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    got.sequences, got.scores = got.sequences.cpu(), [scores.cpu() for scores in got.scores]
    assert_same(got, reference_run(name))
    steps = 12  # 11 decode steps, and the prefill's last chunk of one column (a real token in every row: decode-shaped)
    if name == "gemma3":  # every layer, sliding and global, every decode step
        assert len(kernel_calls) == model.config.num_hidden_layers * steps
    else:  # MiMo's sliding layers have sinks: its global layers only
        full = model.config.layer_types.count("full_attention")
        assert 0 < full < model.config.num_hidden_layers and len(kernel_calls) == full * steps


def test_a_gpu_triton_cannot_build_for_decodes_with_sdpa_and_says_so(monkeypatch):
    """Triton refusing to build the kernels (here: too little shared memory) switches them off with a warning,
    and that step and every later one write and attend with SDPA: Transformers' tokens all the same."""
    from triton.runtime.errors import OutOfResources

    from tests.test_generation import models, reference_run

    attempts = []

    def refused(*args):
        attempts.append(1)
        raise OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(_kernels._ring_decode, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(_kernels._ring_decode, "unbuildable", False)
    monkeypatch.setattr(_ring_decode, "ring_attention", refused)
    warnings = []
    monkeypatch.setattr(_kernels.logger, "warning", lambda message, *args: warnings.append(message % args))
    window, lengths = 4, (37, 2, 19, 64)
    _, rolling = models(window)
    input_ids, attention_mask = ragged_batch(list(lengths), seed=len(lengths))
    got = rolling.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3 * window + 2, do_sample=False,
        past_key_values=RollingSlidingWindowCache(config=rolling.config), output_scores=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    expected = reference_run(window, lengths)
    assert attempts == [1] and _kernels._ring_decode.unbuildable
    assert len(warnings) == 1 and "could not build the decode kernels" in warnings[0]
    assert "OutOfResources" in warnings[0] and "decoding with SDPA" in warnings[0]
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
