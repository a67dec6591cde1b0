"""The kernels: the exact dense kernel against a naive loop, the decode kernel and the blockwise kernel (score caps,
attention sinks) against the dense one, each over the masks of a step plan."""

import pytest
import torch

from hf_rolling_cache._kernels import attend_ring, blockwise_attention, dense_attention
from hf_rolling_cache._plan import build_plan


def _naive_attention(query, keys, values, allowed, scaling):
    """Per query and head: softmax over the allowed keys of its kv head, with plain loops."""
    out = torch.zeros_like(query)
    group = query.shape[1] // keys.shape[1]
    for t in range(query.shape[0]):
        for h in range(query.shape[1]):
            kv_head = h // group
            columns = [s for s in range(keys.shape[0]) if allowed[t][s]]
            scores = torch.stack([query[t, h] @ keys[s, kv_head] * scaling for s in columns])
            weights = torch.softmax(scores, dim=0)
            out[t, h] = sum(w * values[s, kv_head] for w, s in zip(weights, columns))
    return out


@pytest.mark.parametrize("query_heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_dense_kernel_matches_a_naive_loop(query_heads, kv_heads):
    torch.manual_seed(0)
    plan = build_plan(window=3, q_length=3, q_seqlens=[3, 1, 2], seen=[2, 4, 0])
    query = torch.randn(plan.num_queries, query_heads, 8)
    keys = torch.randn(plan.num_keys, kv_heads, 8)
    values = torch.randn(plan.num_keys, kv_heads, 8)
    allowed = plan.dense_mask().exp().bool().tolist()
    got = dense_attention(query, keys, values, plan.dense_mask(), 0.35)
    torch.testing.assert_close(got, _naive_attention(query, keys, values, allowed, 0.35), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_seqlens", [(3, 2, 3), (1, 4, 2), (4, 4, 4)])
def test_ring_decode_kernel_equals_the_padded_keys_mask(kv_seqlens):
    """The decode kernel (SDPA with a key-padding mask) against BlockDiagonalCausalWithOffsetPaddedKeysMask."""
    window, batch = 4, 3
    seen = [n - 1 if n < window else n + 5 for n in kv_seqlens]  # seen + 1 tokens after this step's write
    plan = build_plan(window=window, q_length=1, q_seqlens=[1] * batch, seen=seen)
    assert plan.kv_seqlens == kv_seqlens
    torch.manual_seed(0)
    query = torch.randn(batch, 4, 1, 8)
    ring_keys, ring_values = torch.randn(batch, window, 2, 8), torch.randn(batch, window, 2, 8)
    cpu = torch.device("cpu")
    expected = dense_attention(
        query[:, :, 0], ring_keys.reshape(-1, 2, 8), ring_values.reshape(-1, 2, 8), plan.dense_mask(), 0.3
    )
    for key_mask in (plan.key_padding(cpu), plan.key_bias(cpu, query.dtype)):  # boolean, and the shared bias
        got = attend_ring(query, ring_keys, ring_values, key_mask, 0.3)  # [B, 1, H, D]
        torch.testing.assert_close(got[:, 0], expected, rtol=1e-5, atol=1e-5)
    bias = plan.key_bias(cpu, query.dtype)
    if bias is not None:
        assert bias.dtype == query.dtype and set(bias.unique().tolist()) <= {0.0, -torch.inf}
        assert torch.equal(bias == 0, plan.key_padding(cpu))


@pytest.mark.parametrize("window", [3, None])
@pytest.mark.parametrize("softcap,with_sinks", [(None, True), (2.0, False), (2.0, True)])
def test_blockwise_kernel_equals_the_materialized_mask(window, softcap, with_sinks):
    """The CUDA path for capped scores and sinks (positions, blocks of queries) against the dense mask path."""
    torch.manual_seed(0)
    capacity = None if window is not None else 16
    plan = build_plan(window=window, q_length=5, q_seqlens=[5, 1, 3], seen=[2, 7, 0], capacity=capacity)
    query = torch.randn(plan.num_queries, 4, 8)
    keys, values = torch.randn(plan.num_keys, 2, 8), torch.randn(plan.num_keys, 2, 6)  # narrower values
    sinks = torch.randn(4) if with_sinks else None
    expected = dense_attention(query, keys, values, plan.dense_mask(), 0.4, softcap, sinks)
    got = blockwise_attention(query, keys, values, plan, 0.4, softcap, sinks, block=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sinks_and_softcap_match_transformers_eager_formulas():
    """One head by hand: tanh cap, then a sink logit that joins the denominator and attends to nothing."""
    torch.manual_seed(1)
    query, keys, values = torch.randn(1, 1, 4), torch.randn(3, 1, 4), torch.randn(3, 1, 4)
    sink, cap = torch.tensor([0.7]), 1.5
    scores = torch.tanh((query[0, 0] @ keys[:, 0].T) * 0.5 / cap) * cap
    weights = torch.exp(scores) / (torch.exp(scores).sum() + torch.exp(sink))
    got = dense_attention(query, keys, values, torch.zeros(1, 3), 0.5, cap, sink)
    torch.testing.assert_close(got[0, 0], weights @ values[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap,with_sinks", [(None, True), (3.0, False)])
def test_ring_decode_with_softcap_or_sinks_equals_the_dense_path(softcap, with_sinks):
    window, batch = 4, 3
    plan = build_plan(window=window, q_length=1, q_seqlens=[1] * batch, seen=[1, 6, 3])
    torch.manual_seed(0)
    query = torch.randn(batch, 4, 1, 8)
    ring_keys, ring_values = torch.randn(batch, window, 2, 8), torch.randn(batch, window, 2, 8)
    sinks = torch.randn(4) if with_sinks else None
    cpu = torch.device("cpu")
    expected = dense_attention(query[:, :, 0], ring_keys.reshape(-1, 2, 8), ring_values.reshape(-1, 2, 8),
                               plan.dense_mask(), 0.3, softcap, sinks)
    for key_mask in (plan.key_padding(cpu), plan.key_bias(cpu, query.dtype)):
        got = attend_ring(query, ring_keys, ring_values, key_mask, 0.3, softcap, sinks)
        torch.testing.assert_close(got[:, 0], expected, rtol=1e-5, atol=1e-5)
