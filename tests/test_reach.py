"""Prefill chunks that stop under the layers nobody reads (`hf_rolling_cache._reach`): how many layers a chunk
runs, against a walk of the dependencies column by column; that generate then gives Transformers' tokens and
logits and leaves the cache it would have left, with fewer layer runs; and that nothing is skipped where someone
would see it."""

import contextlib
import random
import warnings
from unittest import mock

import pytest
import torch

import hf_rolling_cache
from hf_rolling_cache import RollingSlidingWindowCache, release_cuda_graphs, use_cuda_graphs
from hf_rolling_cache._reach import layers_to_run
from tests.conftest import model_pair, ragged_batch, tiny_config
from tests.families import pair


def columns_read(windows, capacities, prefill_end: int) -> list[set[int]]:
    """Per layer, the columns whose keys and values, or whose output, the last column's logits or the kept cache
    depend on, walked column by column from the top: a query at column p of a sliding layer reads the keys of
    columns p - window + 1 ... p; a ring keeps its last ``capacity`` columns; a global layer keeps them all."""
    read = {prefill_end - 1}  # the top layer's output: the logits of the last column
    per_layer = [set() for _ in windows]
    for layer in reversed(range(len(windows))):
        window = windows[layer]
        if window is None:
            kv = set(range(prefill_end))
        else:
            kv = set(range(max(0, prefill_end - capacities[layer]), prefill_end))
            for p in read:
                kv |= set(range(max(0, p - window + 1), p + 1))
        per_layer[layer] = kv | read
        read = per_layer[layer]  # the layer's input there: the output of the layer below
    return per_layer


def layers_needed(per_layer: list[set[int]], chunk_start: int, chunk_end: int) -> int:
    """The highest layer that needs any column of the chunk, plus one (at least one)."""
    needed = [layer for layer, read in enumerate(per_layer) if any(chunk_start <= c < chunk_end for c in read)]
    return max(needed, default=0) + 1


def test_layers_to_run_is_the_highest_layer_a_chunk_is_read_from():
    rng = random.Random(0)
    for _ in range(300):
        count = rng.randint(1, 6)
        windows = [None if rng.random() < 0.2 else rng.randint(1, 9) for _ in range(count)]
        capacities = [rng.randint(1, 12) if w is None else w + rng.choice([0, 0, 1, 3]) for w in windows]
        prefill_end = rng.randint(2, 60)
        per_layer = columns_read(windows, capacities, prefill_end)
        chunk_start = rng.randrange(prefill_end - 1)
        chunk_end = rng.randint(chunk_start + 1, prefill_end - 1)
        assert layers_to_run(windows, capacities, chunk_end, prefill_end) == layers_needed(
            per_layer, chunk_start, chunk_end), (windows, capacities, chunk_start, chunk_end, prefill_end)
    # the walk's own sense: a 4-layer model, window 4, a prompt of 37 columns in chunks of 4
    per_layer = columns_read([4] * 4, [4] * 4, 37)
    assert [min(read) for read in per_layer] == [24, 27, 30, 33]


class LayerRuns:
    """The layers that write the cache in each forward (a rolling cache's ``update`` is one layer's run; layer 0
    runs first in every forward)."""

    def __init__(self, monkeypatch) -> None:
        self.forwards: list[list[int]] = []
        update = RollingSlidingWindowCache.update

        @torch.compiler.disable  # (as the cache's own update: compiled layers call it eagerly)
        def counted(cache, key_states, value_states, layer_idx, *args, **kwargs):
            if int(layer_idx) == 0:
                self.forwards.append([])
            self.forwards[-1].append(int(layer_idx))
            return update(cache, key_states, value_states, layer_idx, *args, **kwargs)

        monkeypatch.setattr(RollingSlidingWindowCache, "update", counted)

    def counts(self) -> list[int]:
        return [len(runs) for runs in self.forwards]


def one_row_layers(monkeypatch, module) -> list[int]:
    """The layers whose products after the keys and values are cut to one row (`_kept_rows.last_layer_swaps`, as
    ``module`` calls it), one entry per forward that cuts."""
    layers = []
    swaps = module.last_layer_swaps
    monkeypatch.setattr(module, "last_layer_swaps", lambda layer: layers.append(layer.self_attn.layer_idx) or
                        swaps(layer))
    return layers


def prefill_counts(cache, prompt_columns: int, chunk: int) -> list[int]:
    """Layers each prefill chunk runs where they stop as `columns_read` says (the last chunk: every layer)."""
    windows = [layer.window for layer in cache.layers]
    per_layer = columns_read(windows, [layer.capacity for layer in cache.layers], prompt_columns)
    starts = range(0, prompt_columns, chunk)
    return [layers_needed(per_layer, s, s + chunk) for s in starts[:-1]] + [len(windows)]


@contextlib.contextmanager
def switched_on(model, how: str):
    """The rolling path that watches generate's prefill: ``enable``, or ``use_cuda_graphs`` (its decode steps eager
    here, without CUDA)."""
    if how == "enable":
        hf_rolling_cache.enable(model)
        try:
            yield
        finally:
            hf_rolling_cache.disable(model)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (no CUDA)
            use_cuda_graphs(model)
        try:
            yield
        finally:
            release_cuda_graphs(model)


def every_layer(windows, *args):
    return len(windows)


PROMPTS, CHUNK, NEW = [37, 20, 33], 4, 5


def run(model, cache, **options):
    input_ids, attention_mask = ragged_batch(PROMPTS, vocab=97, seed=5)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, prefill_chunk_size=CHUNK, output_logits=True, return_dict_in_generate=True,
                          past_key_values=cache, **options)


@torch.no_grad()
@pytest.mark.parametrize("how", ["enable", "use_cuda_graphs"])
@pytest.mark.parametrize("name", ["mistral", "mixtral", "phi3", "qwen2"])
def test_prefill_chunks_stop_under_the_layers_nobody_reads_with_transformers_tokens_and_cache(name, how, monkeypatch):
    """Every layer slides (Mistral; Mixtral's experts; Phi-3's fused products), or the top ones do (Qwen2: two
    global layers, then two sliding): a ragged, left-padded batch in chunks of 4 against Transformers' own generate,
    and the cache against the same generation with every layer run."""
    from hf_rolling_cache import _kept_rows

    reference, rolling = pair(name, window=4, seed=1)
    theirs = run(reference, None)
    counted = LayerRuns(monkeypatch)
    one_row = one_row_layers(monkeypatch, _kept_rows)
    with switched_on(rolling, how):
        cache = RollingSlidingWindowCache(config=rolling.config)
        ours = run(rolling, cache)
        runs = counted.counts()
        with mock.patch("hf_rolling_cache._reach.layers_to_run", every_layer):
            whole = RollingSlidingWindowCache(config=rolling.config)
            run(rolling, whole)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=0, atol=1e-4)
    layers, chunks = len(cache.layers), -(-max(PROMPTS) // CHUNK)
    assert runs == prefill_counts(cache, max(PROMPTS), CHUNK) + [layers] * (NEW - 1)
    assert sum(runs[:chunks]) < layers * chunks  # (with every layer run: all of them)
    assert counted.counts()[len(runs):] == [layers] * (chunks + NEW - 1)
    # under use_cuda_graphs, the top layer a chunk runs computes one row after its keys and values (the last chunk
    # is one column here: nothing to cut)
    expected = [count - 1 for count in runs[: chunks - 1]] + [layers - 1] * (chunks - 1)
    assert one_row == (expected if how == "use_cuda_graphs" else [])
    for skipped, kept in zip(cache.layers, whole.layers):
        assert torch.equal(skipped.slot_keys, kept.slot_keys) and torch.equal(skipped.slot_values, kept.slot_values)


@torch.no_grad()
def test_an_unpadded_batch_and_a_second_turn_stop_their_chunks_too(monkeypatch):
    """generate drops a mask of ones (and slices by the length it recorded): such a batch stops its chunks as a
    padded one does; so does a conversation's second turn on the same cache (its chunks from the cache's length
    on). Tokens and logits: Transformers', for the whole conversation."""
    from tests.conftest import next_turn

    reference, rolling = model_pair(tiny_config(4, layers=4))
    input_ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    counted = LayerRuns(monkeypatch)
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with switched_on(rolling, "enable"):
        cache = RollingSlidingWindowCache(config=rolling.config)
        first = rolling.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                                 prefill_chunk_size=CHUNK, **options)
        first_runs = counted.counts()
        turn, mask = next_turn(first.sequences, torch.ones_like(first.sequences), reply=19, seed=6)
        counted.forwards.clear()
        second = rolling.generate(input_ids=turn, attention_mask=mask, past_key_values=cache, prefill_chunk_size=CHUNK,
                                  **options)
    assert first_runs == prefill_counts(cache, 30, CHUNK) + [4] * 2
    assert sum(first_runs[:-3]) < 4 * len(first_runs[:-3])
    per_layer = columns_read([4] * 4, [4] * 4, turn.shape[1])
    starts = range(first.sequences.shape[1] - 1, turn.shape[1], CHUNK)  # (the first turn's last token: not held)
    assert counted.counts() == [layers_needed(per_layer, s, s + CHUNK) for s in starts[:-1]] + [4] * 3
    assert sum(counted.counts()[:-3]) < 4 * len(counted.counts()[:-3])
    for ours, ids in ((first, input_ids), (second, turn)):
        theirs = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        assert torch.equal(ours.sequences, theirs.sequences)
        torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=0, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("ring", ["8-bit", "slack"])
def test_an_8_bit_ring_and_a_ring_with_slack_keep_what_they_would_have_kept(ring, monkeypatch):
    """The 8-bit ring's codes and scales are those of a run of every layer; a ring with slack for rollbacks keeps
    its slack's columns too (its chunks stop later), and decodes Transformers' tokens."""
    reference, rolling = model_pair(tiny_config(4, layers=4))
    options = dict(kv_dtype=torch.float8_e4m3fn) if ring == "8-bit" else dict(slack=5)
    theirs = run(reference, None)
    counted = LayerRuns(monkeypatch)
    with switched_on(rolling, "use_cuda_graphs"):
        cache = RollingSlidingWindowCache(config=rolling.config, **options)
        ours = run(rolling, cache)
        runs = counted.counts()
        with mock.patch("hf_rolling_cache._reach.layers_to_run", every_layer):
            whole = RollingSlidingWindowCache(config=rolling.config, **options)
            run(rolling, whole)
    assert runs == prefill_counts(cache, max(PROMPTS), CHUNK) + [4] * (NEW - 1)
    assert sum(runs) < sum(counted.counts()[len(runs):])
    for skipped, kept in zip(cache.layers, whole.layers):
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(skipped.storage(), kept.storage()))
    if ring == "slack":
        assert torch.equal(ours.sequences, theirs.sequences)
        assert runs != prefill_counts(RollingSlidingWindowCache(config=rolling.config), max(PROMPTS), CHUNK) + \
            [4] * (NEW - 1)  # (rings of the window alone would stop some chunks sooner)


@contextlib.contextmanager
def hooked(model, where: str):
    """Someone else's code that would miss a skipped layer's run, or see a stopped chunk's outputs."""
    hook = lambda *args: None  # noqa: E731
    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
    else:
        module = {"top layer": model.model.layers[-1], "final norm": model.model.norm, "model": model}[where]
        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
@pytest.mark.parametrize("where", ["top layer", "final norm", "model", "global", "output_hidden_states"])
def test_no_chunk_stops_where_someone_would_see_it(where, monkeypatch):
    """A hook (on a layer, the final norm, the model, or every module), or hidden states asked for: every layer runs
    for every chunk, and the tokens are Transformers'."""
    reference, rolling = model_pair(tiny_config(4, layers=4))
    counted = LayerRuns(monkeypatch)
    options = dict(output_hidden_states=True) if where == "output_hidden_states" else {}
    with switched_on(rolling, "use_cuda_graphs"), (
            contextlib.nullcontext() if options else hooked(rolling, where)):
        ours = run(rolling, RollingSlidingWindowCache(config=rolling.config), **options)
    assert counted.counts() == [4] * (-(-max(PROMPTS) // CHUNK) + NEW - 1)
    assert torch.equal(ours.sequences, run(reference, None).sequences)


@torch.no_grad()
def test_chunks_of_one_column_run_every_layer(monkeypatch):
    """A chunk of one column is decode-shaped: under ``use_cuda_graphs`` on a GPU its forward may be the one whose
    step is captured and then replayed for every later token, so it runs every layer."""
    reference, rolling = model_pair(tiny_config(4, layers=4))
    counted = LayerRuns(monkeypatch)
    input_ids, attention_mask = ragged_batch([20, 13], vocab=97, seed=5)
    with switched_on(rolling, "use_cuda_graphs"):
        ours = rolling.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False,
                                pad_token_id=0, prefill_chunk_size=1, past_key_values=RollingSlidingWindowCache(
                                    config=rolling.config))
    assert counted.counts() == [4] * (20 + 2)
    theirs = reference.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3,
                                do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_enable_and_use_cuda_graphs_each_watch_the_prefill_until_undone(monkeypatch):
    """Both switched on, then off in either order: the prefill is watched while either is on, and nothing of ours
    is left on the model after both."""
    _, rolling = model_pair(tiny_config(4, layers=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no CUDA)
        for first, second in [("enable", "graphs"), ("graphs", "enable")]:
            hf_rolling_cache.enable(rolling)
            use_cuda_graphs(rolling)
            assert "_prefill" in vars(rolling)
            undo = {"enable": hf_rolling_cache.disable, "graphs": release_cuda_graphs}
            undo[first](rolling)
            counted = LayerRuns(monkeypatch)
            run(rolling, RollingSlidingWindowCache(config=rolling.config))
            assert sum(counted.counts()) < 4 * len(counted.counts())  # still watched: chunks stopped early
            undo[second](rolling)
            assert not any(name.startswith("_hf_rolling_cache") or name == "_prefill" for name in vars(rolling))
            assert type(rolling.model.layers) is torch.nn.ModuleList
            assert not rolling._forward_hooks and not rolling._forward_pre_hooks
            rolling.set_attn_implementation("rolling_xformers")
            counted.forwards.clear()
            run(rolling, RollingSlidingWindowCache(config=rolling.config))
            assert all(count == 4 for count in counted.counts())  # a plain generate: every layer runs


@torch.no_grad()
def test_another_thread_sees_every_layer_while_a_chunk_has_stopped(monkeypatch):
    """The cut is this thread's: while one thread is inside a stopped chunk, another thread's forward and generate
    on the same model run every layer (Transformers' logits and tokens), and the first thread's generation is
    Transformers' too."""
    import threading

    reference, rolling = model_pair(tiny_config(4, layers=4))
    short = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(8))
    expected_logits = reference(input_ids=short).logits
    expected_tokens = reference.generate(input_ids=short, max_new_tokens=3, do_sample=False, pad_token_id=0)
    inside, done, seen = threading.Event(), threading.Event(), {}
    update = RollingSlidingWindowCache.update

    def pausing(cache, key_states, value_states, layer_idx, *args, **kwargs):
        if threading.current_thread().name == "long" and cache.ledger.layers_run is not None and not inside.is_set():
            inside.set()  # a stopped chunk of the long prompt is running: let the other thread go, then go on
            done.wait(timeout=60)
        return update(cache, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(RollingSlidingWindowCache, "update", pausing)

    def other():
        inside.wait(timeout=60)
        try:
            seen["layers"] = len(rolling.model.layers)
            seen["logits"] = rolling(input_ids=short, use_cache=False).logits
            seen["tokens"] = rolling.generate(input_ids=short, max_new_tokens=3, do_sample=False, pad_token_id=0)
        finally:
            done.set()

    with switched_on(rolling, "enable"):
        thread = threading.Thread(target=other)
        thread.start()
        result = {}
        long = threading.Thread(target=lambda: result.update(out=run(rolling, RollingSlidingWindowCache(
            config=rolling.config))), name="long")
        long.start()
        long.join(timeout=120)
        thread.join(timeout=120)
    assert inside.is_set() and seen["layers"] == 4
    torch.testing.assert_close(seen["logits"], expected_logits, rtol=0, atol=1e-4)
    assert torch.equal(seen["tokens"], expected_tokens)
    assert torch.equal(result["out"].sequences, run(reference, None).sequences)


@torch.no_grad()
def test_a_model_with_a_prefill_of_its_own_is_not_watched():
    _, rolling = model_pair(tiny_config(4, layers=2))

    class OwnPrefill(type(rolling)):
        def _prefill(self, *args, **kwargs):
            return super()._prefill(*args, **kwargs)

    rolling.__class__ = OwnPrefill
    hf_rolling_cache.enable(rolling)
    assert "_prefill" not in vars(rolling)
    hf_rolling_cache.disable(rolling)


@torch.no_grad()
def test_the_compiled_prefill_stops_its_chunks_too(compiled_prefill_on_cpu, fresh_dynamo, monkeypatch):
    """``use_cuda_graphs(compile=True, compile_prefill=True)`` (its prefill made to run on CPU tensors): the chunks
    run their layers compiled and stop as the eager ones do, the top layer each runs computing its products after
    the keys and values for the last row only (`_kept_rows`: nothing reads that layer's rows), with Transformers'
    tokens and logits, and no more compiled code than with every layer run."""
    from hf_rolling_cache import _compiled

    reference, rolling = model_pair(tiny_config(4, layers=4))
    counted = LayerRuns(monkeypatch)
    one_row = one_row_layers(monkeypatch, _compiled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no CUDA: decode steps eager)
        use_cuda_graphs(rolling, compile=True, compile_prefill=True)
    compiled = {}
    try:
        for name in ("every layer", "stopping"):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            with mock.patch("hf_rolling_cache._reach.layers_to_run", every_layer) if name == "every layer" else \
                    contextlib.nullcontext():
                one_row.clear()
                counted.forwards.clear()
                compiled_prefill_on_cpu.clear()
                cache = RollingSlidingWindowCache(config=rolling.config)
                ours = run(rolling, cache)
            compiled[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        release_cuda_graphs(rolling)
    theirs = run(reference, None)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=0, atol=1e-4)
    expected = prefill_counts(cache, max(PROMPTS), CHUNK)
    assert counted.counts()[: len(expected) + NEW - 1] == expected + [4] * (NEW - 1)
    assert max(PROMPTS) % CHUNK == 1  # (the last chunk is one column: a decode-shaped forward, not compiled)
    assert len(compiled_prefill_on_cpu) == sum(expected[:-1])  # each run compiled, attention by FlexAttention
    assert one_row[: len(expected) - 1] == [count - 1 for count in expected[:-1]]
    assert compiled["stopping"] <= compiled["every layer"]  # (no compiled code of its own)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("compiled", [True, False])
def test_on_gpu_chunks_stop_with_the_logits_and_cache_of_every_layer_bit_for_bit(compiled, monkeypatch):
    """bf16 on CUDA, through ``use_cuda_graphs`` (compiled prefill by cuDNN or FlexAttention; or eager, by xFormers):
    a ragged batch in chunks of 128 stops its chunks as `columns_read` says, and its logits and cache are those of
    the same generation with every layer run, bit for bit (the rows kept are computed by the same kernels on the
    same shapes, and what the skipped layers left in the rings is masked out)."""
    from tests.test_gpu import gpu_model

    model = gpu_model(torch.bfloat16, window=128, layers=4)
    model.set_attn_implementation("rolling_xformers")
    input_ids, attention_mask = (t.cuda() for t in ragged_batch([700, 300, 650], vocab=1000, seed=3))
    counted = LayerRuns(monkeypatch)

    def generate(cache):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=0, prefill_chunk_size=128, output_logits=True,
                              return_dict_in_generate=True, past_key_values=cache)

    use_cuda_graphs(model, compile=compiled, compile_prefill=compiled)
    try:
        cache = RollingSlidingWindowCache(config=model.config)
        ours = generate(cache)
        runs = counted.counts()
        with mock.patch("hf_rolling_cache._reach.layers_to_run", every_layer):
            whole = RollingSlidingWindowCache(config=model.config)
            theirs = generate(whole)
    finally:
        release_cuda_graphs(model)
    chunks = -(-700 // 128)
    assert runs[:chunks] == prefill_counts(cache, 700, 128) and sum(runs[:chunks]) < 4 * chunks
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))
    for skipped, kept in zip(cache.layers, whole.layers):
        assert all(torch.equal(a, b) for a, b in zip(skipped.storage(), kept.storage()))
