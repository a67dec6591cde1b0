"""On CUDA (the device machine): bf16 teacher-forced logits of the xFormers path against the exact-kernel path and
Transformers' sdpa path. Skipped without a GPU (see conftest)."""

import copy

import pytest
import torch
from transformers import DynamicCache

from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache import _kernels
from tests.conftest import ragged_batch, tiny_config

pytestmark = pytest.mark.gpu

WINDOW = 16
LENGTHS = [37, 2, 19, 64]  # ragged, and longer than the window


def gpu_model(dtype, *, window=WINDOW, heads=8, head_dim=64, layers=4):
    config = tiny_config(window, kv_heads=2, heads=heads, head_dim=head_dim, layers=layers, vocab=1000)
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    from transformers import MistralForCausalLM

    return MistralForCausalLM(config).eval().to("cuda", dtype)


@torch.no_grad()
def teacher_forced(model, make_cache, chunk, continuation, lengths=LENGTHS):
    """Logits of every step: the prompt in column chunks (as generate does), then the fixed continuation."""
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(lengths, vocab=1000, seed=3))
    cache = make_cache(model)
    width = input_ids.shape[1]
    logits = []
    for start in range(0, width, chunk or width):
        end = min(width, start + (chunk or width))
        out = model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end], past_key_values=cache)
    logits.append(out.logits[:, -1].float())
    for column in continuation.T.cuda():
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=column[:, None], attention_mask=attention_mask, past_key_values=cache)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits)


def rolling_cache(model):
    return RollingSlidingWindowCache(config=model.config)


def dynamic_cache(model):
    return DynamicCache(config=model.config)


def references(model, chunk, continuation, lengths=LENGTHS):
    """Teacher-forced logits of Transformers' own paths on ``model``'s weights: bf16 sdpa, and fp32 eager (truth)."""
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    fp32 = copy.deepcopy(model).float()
    fp32.set_attn_implementation("eager")
    return (teacher_forced(sdpa, dynamic_cache, chunk, continuation, lengths),
            teacher_forced(fp32, dynamic_cache, chunk, continuation, lengths))


@pytest.mark.parametrize("chunk", [None, 8, WINDOW])
def test_bf16_logits_agree_with_the_exact_kernel_and_sdpa(chunk):
    continuation = torch.randint(1, 1000, (len(LENGTHS), 3 * WINDOW), generator=torch.Generator().manual_seed(5))
    model = gpu_model(torch.bfloat16)
    model.set_attn_implementation("rolling_xformers")
    xformers_logits = teacher_forced(model, rolling_cache, chunk, continuation)
    assert _kernels._xformers.enabled, "the xFormers kernel fell back"
    with _kernels.exact_kernels():
        exact_logits = teacher_forced(model, rolling_cache, chunk, continuation)
    sdpa_logits, truth = references(model, chunk, continuation)

    def error(logits):
        return (logits - truth).abs().max().item()

    scale = truth.abs().max().item()
    print(f"chunk={chunk} scale={scale:.3f} xformers={error(xformers_logits):.4f} "
          f"exact={error(exact_logits):.4f} sdpa={error(sdpa_logits):.4f}")
    # bf16 tolerance: the rolling path's error against fp32 is of the order of Transformers' own bf16 path's
    assert error(xformers_logits) <= 2 * error(sdpa_logits) + 1e-2 * scale
    assert error(exact_logits) <= 2 * error(sdpa_logits) + 1e-2 * scale
    assert (xformers_logits - exact_logits).abs().max().item() <= 2e-2 * scale


def test_generate_on_gpu_matches_sdpa_tokens_in_fp32():
    model = gpu_model(torch.float32)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    model.set_attn_implementation("rolling_xformers")
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, vocab=1000, seed=3))
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3 * WINDOW, do_sample=False,
                   pad_token_id=0)
    expected = sdpa.generate(**options)
    got = model.generate(**options, past_key_values=rolling_cache(model), prefill_chunk_size=WINDOW)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("chunk,beams,compiled", [
    (None, 1, False), (1, 1, False), (WINDOW, 2, False), (None, 1, True), (1, 1, True), (WINDOW, 2, True)
])
def test_cuda_graph_decoding_matches_eager(chunk, beams, compiled):
    """Replayed decode steps give the eager rolling path's tokens and logits (chunk 1: padded decode-shaped
    prefill steps go through the graph; beams: rows are reordered in place under the graph), with and without
    the decoder layers compiled (their q/k/v and gate/up products fused)."""
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs

    # fp32: both paths must pick the same tokens, and bf16 near-ties would let two SDPA kernels disagree
    model = gpu_model(torch.float32)
    model.set_attn_implementation("rolling_xformers")
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, vocab=1000, seed=3))
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3 * WINDOW, do_sample=False,
                   num_beams=beams, prefill_chunk_size=chunk, output_scores=True, return_dict_in_generate=True,
                   pad_token_id=0)
    eager = model.generate(**options, past_key_values=rolling_cache(model))
    use_cuda_graphs(model, compile=compiled)
    try:
        cache = rolling_cache(model)
        graphed = model.generate(**options, past_key_values=cache)
        assert cache.decode_graph is not None, "no decode step was replayed"
    finally:
        release_cuda_graphs(model)
    assert torch.equal(graphed.sequences, eager.sequences)
    for ours, theirs in zip(graphed.scores, eager.scores):
        finite = torch.isfinite(theirs)  # beam search scores carry -inf
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_graphs_in_bf16_agree_with_fp32_like_sdpa(compiled):
    """The captured decode step in bf16, compiled or not, called as a model call without position_ids on a
    left-padded batch: its logits' error against fp32 is of the order of Transformers' own bf16 sdpa path's."""
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs

    continuation = torch.randint(1, 1000, (len(LENGTHS), 3 * WINDOW), generator=torch.Generator().manual_seed(5))
    model = gpu_model(torch.bfloat16)
    model.set_attn_implementation("rolling_xformers")
    eager_logits = teacher_forced(model, rolling_cache, WINDOW, continuation)
    use_cuda_graphs(model, compile=compiled)
    try:
        graph_logits = teacher_forced(model, rolling_cache, WINDOW, continuation)
    finally:
        release_cuda_graphs(model)
    sdpa_logits, truth = references(model, WINDOW, continuation)
    scale = truth.abs().max().item()
    errors = {name: (logits - truth).abs().max().item()
              for name, logits in (("graph", graph_logits), ("eager", eager_logits), ("sdpa", sdpa_logits))}
    print(f"scale={scale:.3f} " + " ".join(f"{k}={v:.4f}" for k, v in errors.items()))
    assert errors["graph"] <= 2 * errors["sdpa"] + 2e-3 * scale


def test_graphs_stop_one_step_late_and_give_back_the_plain_loops_output(undone_steps):
    """With decode steps replayed, generate reads its stop flag a step late (`_stop_check`): rows end at an end
    token, the one extra step is undone, and tokens, scores and the cache (its next turn) are the eager loop's."""
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs

    model = gpu_model(torch.float32)
    model.set_attn_implementation("rolling_xformers")
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, vocab=1000, seed=3))
    options = dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=0,
                   output_scores=True, return_dict_in_generate=True)
    free = model.generate(**options, max_new_tokens=2 * WINDOW, past_key_values=rolling_cache(model))
    # every row ends at a token it generates within 2 windows (if not at another row's first)
    options.update(eos_token_id=[int(row[-1]) for row in free.sequences], max_new_tokens=4 * WINDOW)
    eager_cache = rolling_cache(model)
    eager = model.generate(**options, past_key_values=eager_cache)
    use_cuda_graphs(model)
    try:
        graph_cache = rolling_cache(model)
        graphed = model.generate(**options, past_key_values=graph_cache)
        assert graph_cache.decode_graph is not None, "no decode step was replayed"
        assert undone_steps == [1], "generate should have run one step past the end and undone it"
        assert torch.equal(graphed.sequences, eager.sequences)
        for ours, theirs in zip(graphed.scores, eager.scores, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        assert graph_cache.seen == eager_cache.seen
        turn = torch.cat([graphed.sequences, torch.randint(1, 1000, (len(LENGTHS), 5), device="cuda")], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(turn[:, attention_mask.shape[1]:])], dim=1)
        follow = dict(input_ids=turn, attention_mask=mask, max_new_tokens=WINDOW, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**follow, past_key_values=graph_cache),
                           model.generate(**follow, past_key_values=eager_cache))
    finally:
        release_cuda_graphs(model)


def test_no_garbage_collection_while_a_step_is_captured():
    """Python's collector runs at any allocation, and may free an earlier cache's CUDA graphs then: one destroyed
    while another step is being captured invalidates that capture (cuBLAS failed mid-capture, in a model split over
    two GPUs, about one generation in ten). With the collector's first threshold at one allocation it would run
    inside every capture; the capture pauses it."""
    import gc

    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs

    model = gpu_model(torch.float32)
    model.set_attn_implementation("rolling_xformers")
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, vocab=1000, seed=3))
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False,
                   pad_token_id=0)
    expected = model.generate(**options, past_key_values=rolling_cache(model))
    collections = {"capturing": 0, "else": 0}

    def count(phase, info):
        if phase == "start":
            collections["capturing" if torch.cuda.is_current_stream_capturing() else "else"] += 1

    use_cuda_graphs(model)
    thresholds = gc.get_threshold()
    gc.callbacks.append(count)
    gc.set_threshold(1)
    try:
        for _ in range(2):  # the second capture runs with the first cache's graph as garbage
            cache = rolling_cache(model)
            got = model.generate(**options, past_key_values=cache)
            assert cache.decode_graph is not None, "no decode step was replayed"
            assert torch.equal(got, expected)
            del cache
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(count)
        release_cuda_graphs(model)
    assert collections["else"] > 0, "the collector never ran: the threshold did not take"
    assert collections["capturing"] == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_a_weight_replaced_between_turns_is_read_by_the_next_turn(compiled):
    """A cache's captured step reads each weight where it was at capture. A weight replaced before the next turn on
    the same cache (a new Parameter, as ``load_state_dict(assign=True)`` or ``model.to`` make; here the head and one
    fused k projection) must be read there: the step is captured again. fp32, against the eager path on a copy
    given the same weights."""
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs

    model = gpu_model(torch.float32)
    model.set_attn_implementation("rolling_xformers")
    eager = copy.deepcopy(model)
    input_ids, attention_mask = (t.cuda() for t in ragged_batch(LENGTHS, vocab=1000, seed=3))
    options = dict(max_new_tokens=WINDOW, do_sample=False, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True)
    use_cuda_graphs(model, compile=compiled)
    try:
        caches = {name: rolling_cache(model) for name in ("graphs", "eager")}
        first = {name: m.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=caches[name],
                                  **options) for name, m in (("graphs", model), ("eager", eager))}
        assert torch.equal(first["graphs"].sequences, first["eager"].sequences)
        generator = torch.Generator(device="cuda").manual_seed(7)
        for m in (model, eager):
            for name in ("lm_head", "model.layers.1.self_attn.k_proj"):
                module = m.get_submodule(name)
                module.weight = torch.nn.Parameter(
                    torch.randn(module.weight.shape, generator=generator.manual_seed(7), device="cuda") * 0.05)
        turn = torch.cat([first["eager"].sequences, torch.randint(1, 1000, (len(LENGTHS), 3), device="cuda")], 1)
        mask = torch.cat([attention_mask, torch.ones_like(turn[:, attention_mask.shape[1]:])], dim=1)
        second = {name: m.generate(input_ids=turn, attention_mask=mask, past_key_values=caches[name], **options)
                  for name, m in (("graphs", model), ("eager", eager))}
        assert caches["graphs"].decode_graph is not None, "no decode step was replayed"
    finally:
        release_cuda_graphs(model)
    assert torch.equal(second["graphs"].sequences, second["eager"].sequences)
    for ours, theirs in zip(second["graphs"].scores, second["eager"].scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
