"""The compiled prefill's last layer computing only the rows that are read (`hf_rolling_cache._kept_rows`): when it
applies, that it gives Transformers' logits where they are read and a cache that decodes as Transformers does, and
that the rows not read were really not computed."""

import copy
import types
import warnings

import pytest
import torch

from hf_rolling_cache import RollingSlidingWindowCache
from hf_rolling_cache._compiled import CompiledLayers
from hf_rolling_cache._kept_rows import last_layer_swaps, last_row_only
from tests.conftest import model_pair, ragged_batch, tiny_config


class Composite(torch.nn.Module):
    """A model whose decoder has a config of its own (a vision-language model's text config)."""

    def __init__(self, config, text_config) -> None:
        super().__init__()
        self.config, self.decoder = config, torch.nn.Module()
        self.decoder.config = text_config

    def get_decoder(self):
        return self.decoder


def test_last_row_only_where_nothing_but_the_last_logits_is_read():
    _, model = model_pair(tiny_config(5))
    assert last_row_only(model, {"logits_to_keep": 1}) is True
    assert last_row_only(model, {"logits_to_keep": 1, "output_hidden_states": False}) is True
    assert last_row_only(model, {}) is False  # (Transformers' default, 0: every position's logits)
    assert last_row_only(model, {"logits_to_keep": 0}) is False
    assert last_row_only(model, {"logits_to_keep": True}) is False
    assert last_row_only(model, {"logits_to_keep": 3}) is False  # (assisted decoding's drafts: every count compiles)
    assert last_row_only(model, {"logits_to_keep": torch.tensor([0, 2])}) is False  # chosen positions: all computed
    assert last_row_only(model, {"logits_to_keep": torch.tensor(1)}) is False
    for name in ("output_hidden_states", "output_attentions", "output_router_logits", "output_anything_else"):
        assert last_row_only(model, {"logits_to_keep": 1, name: True}) is False, name
    assert last_row_only(model, {"logits_to_keep": 1, "labels": torch.zeros(1, 4, dtype=torch.long)}) is False
    plain = types.SimpleNamespace()
    for name in ("output_hidden_states", "output_attentions", "output_router_logits"):
        asking = types.SimpleNamespace(**{name: True})  # asked by the config: every forward returns them
        assert last_row_only(Composite(asking, plain), {"logits_to_keep": 1}) is False, name
        assert last_row_only(Composite(plain, asking), {"logits_to_keep": 1}) is False, name  # the decoder's
        assert last_row_only(Composite(asking, asking), {"logits_to_keep": 1, name: False}) is True, name
    assert last_row_only(Composite(plain, plain), {"logits_to_keep": 1}) is True


def swapped(layer) -> set:
    return {module for module, name, _ in last_layer_swaps(layer) if name == "forward"}


def test_the_last_layer_keeps_its_query_output_and_mlp_products_unless_someone_sees_its_rows():
    _, model = model_pair(tiny_config(5))
    layer = model.model.layers[-1]
    assert swapped(layer) == {layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp}  # (k and v: every row)
    for module in (layer, layer.mlp, layer.mlp.down_proj, layer.self_attn.k_proj):  # a hook anywhere in the layer
        handle = module.register_forward_hook(lambda *args: None)
        try:
            assert swapped(layer) == set(), module
        finally:
            handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)  # a global hook
    try:
        assert swapped(layer) == set()
    finally:
        handle.remove()
    assert swapped(layer) == {layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp}
    layer.mlp.register_parameter("scale", torch.nn.Parameter(torch.ones(3)))  # a parameter of its own
    assert swapped(layer) == {layer.self_attn.q_proj, layer.self_attn.o_proj}


def test_a_mixture_of_experts_keeps_its_mlp_whole():
    """Experts as ``nn.Linear`` modules too (not children of the MLP itself): routing may not work token by token,
    and a caller may read the router's logits."""
    from tests.families import build

    model = build("qwen2_moe", window=5, seed=1)  # (experts as parameters of a module of their own)
    layer = model.get_decoder().layers[-1]
    assert layer.mlp not in swapped(layer) and layer.self_attn.o_proj in swapped(layer)
    _, model = model_pair(tiny_config(5))
    layer = model.model.layers[-1]
    mlp = torch.nn.Module()  # a router and experts, every parameter in an nn.Linear
    mlp.gate = torch.nn.Linear(64, 2, bias=False)
    mlp.experts = torch.nn.ModuleList(copy.deepcopy(layer.mlp) for _ in range(2))
    layer.mlp = mlp
    assert mlp not in swapped(layer) and layer.self_attn.o_proj in swapped(layer)


def models(name: str, window: int):
    """Transformers' reference and its rolling twin: the tests' small Mistral, or a family of `tests.families`
    (Gemma 3: sliding and global layers, q/k norms, norms after attention and MLP)."""
    from tests.families import pair

    return model_pair(tiny_config(window, layers=2)) if name == "mistral" else pair(name, window, seed=1)


class LayerChanges:
    """What the first and the last decoder layer add to their input hidden states, per forward. A hook on the last
    layer (or inside it) would see its rows, so it would keep them all: its input is read from a hook on the layer
    before it, its output from one on the final norm."""

    def __init__(self, model) -> None:
        decoder = model.get_decoder()
        self.first, self.last = [], []
        self.handles = [
            decoder.layers[0].register_forward_hook(self.first_layer, with_kwargs=True),
            decoder.layers[-2].register_forward_hook(self.before_last, with_kwargs=True),
            decoder.norm.register_forward_pre_hook(self.after_last),
        ]
        self.last_input = None

    @staticmethod
    def states(args, kwargs, output=None):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden, output[0] if isinstance(output, tuple) else output

    def first_layer(self, module, args, kwargs, output):
        hidden, output = self.states(args, kwargs, output)
        self.first.append((output - hidden).float())

    def before_last(self, module, args, kwargs, output):
        self.last_input = self.states(args, kwargs, output)[1]

    def after_last(self, module, args):
        self.last.append((args[0] - self.last_input).float())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def same_at_every_position(added: torch.Tensor) -> bool:
    """(Up to rounding: ``(x + a) + b - x`` is not exactly ``a + b``. A layer that computes every row adds
    different amounts at different positions, by far more.)"""
    return torch.allclose(added, added[:, -1:].expand_as(added), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_a_prefill_reading_its_last_position_gives_transformers_logits_there_from_one_row_of_the_last_layer(
        name, flex_on_cpu, fresh_dynamo):
    """A ragged, left-padded prompt in chunks through the compiled prefill with ``logits_to_keep=1``: each chunk's
    last logits are Transformers', the cache then decodes as Transformers does, and the last layer added the same
    to every position of a chunk (its products after the keys and values ran for the last row only), while the
    layers before it did not (nor the last one, when every row is read)."""
    reference, rolling = models(name, window=5)
    input_ids, attention_mask = ragged_batch([13, 2, 9], vocab=97, seed=4)
    layers, cache = CompiledLayers(rolling), RollingSlidingWindowCache(config=rolling.config)
    changes = LayerChanges(rolling)
    try:
        for start in range(0, input_ids.shape[1], 4):
            end = min(input_ids.shape[1], start + 4)
            kwargs = dict(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                          past_key_values=cache, logits_to_keep=1)
            with layers.prefill_swapped_in(last_row_only(rolling, kwargs)):
                ours = rolling(**kwargs).logits[:, -1].float()
            theirs = reference(input_ids=input_ids[:, :end], attention_mask=attention_mask[:, :end]).logits[:, -1]
            real = attention_mask[:, end - 1].bool()
            torch.testing.assert_close(ours[real], theirs.float()[real], rtol=0, atol=1e-4)
        last, first = changes.last, changes.first
        assert all(same_at_every_position(added) for added in last if added.shape[1] > 1)
        assert not any(same_at_every_position(added) for added in first if added.shape[1] > 1)
        # the same forward with every row read: the last layer computes every row
        with layers.prefill_swapped_in(last_row_only(rolling, {})):
            rolling(input_ids=input_ids[:, :4], attention_mask=attention_mask[:, :4],
                    past_key_values=RollingSlidingWindowCache(config=rolling.config))
        assert not same_at_every_position(last[-1])
    finally:
        changes.remove()
    column = torch.tensor([[5], [6], [7]])
    attention_mask = torch.cat([attention_mask, torch.ones_like(column)], dim=1)
    step = rolling(input_ids=column, attention_mask=attention_mask, past_key_values=cache).logits[:, -1]
    full = reference(input_ids=torch.cat([input_ids, column], dim=1), attention_mask=attention_mask).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-4)
    assert all("forward" not in vars(module) for module in rolling.modules())  # nothing of ours left behind


@torch.no_grad()
def test_generate_with_the_compiled_prefill_computes_one_row_of_the_last_layer_and_gives_transformers_tokens(
        compiled_prefill_on_cpu, fresh_dynamo):
    """Through ``use_cuda_graphs(compile=True, compile_prefill=True)`` and generate's chunked prefill (made to run on
    CPU tensors): the prompt's chunks compute one row of the last layer, and the tokens are Transformers'."""
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs

    reference, rolling = model_pair(tiny_config(6, layers=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no CUDA here: decode steps eager)
        use_cuda_graphs(rolling, compile=True, compile_prefill=True)
    input_ids, attention_mask = ragged_batch([23, 5, 17], vocab=97, seed=7)
    changes = LayerChanges(rolling)
    try:
        ours = rolling.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                                pad_token_id=0, prefill_chunk_size=8,
                                past_key_values=RollingSlidingWindowCache(config=rolling.config))
    finally:
        changes.remove()
        release_cuda_graphs(rolling)
    theirs = reference.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4,
                                do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    prefill = [added for added in changes.last if added.shape[1] > 1]
    assert len(prefill) == 3 and all(same_at_every_position(added) for added in prefill)
    assert not any(same_at_every_position(added) for added in changes.first if added.shape[1] > 1)


@torch.no_grad()
@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_eager_prefill_under_use_cuda_graphs_computes_one_row_of_the_last_layer_and_gives_transformers_tokens(name):
    """``use_cuda_graphs(model)`` without compilation (its decode steps eager here, on CPU): generate's prefill
    chunks compute one row of the last layer, a forward asking for every position's logits computes them all, and
    the tokens and logits are Transformers'."""
    from hf_rolling_cache import release_cuda_graphs, use_cuda_graphs
    reference, rolling = models(name, window=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no CUDA here)
        use_cuda_graphs(rolling)
    input_ids, attention_mask = ragged_batch([23, 5, 17], vocab=97, seed=7)
    changes = LayerChanges(rolling)
    try:
        ours = rolling.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                                pad_token_id=0, prefill_chunk_size=8, output_logits=True, return_dict_in_generate=True,
                                past_key_values=RollingSlidingWindowCache(config=rolling.config))
        prefill = [added for added in changes.last if added.shape[1] > 1]
        assert len(prefill) == 3 and all(same_at_every_position(added) for added in prefill)
        assert not any(same_at_every_position(added) for added in changes.first if added.shape[1] > 1)
        whole = rolling(input_ids=input_ids, attention_mask=attention_mask,
                        past_key_values=RollingSlidingWindowCache(config=rolling.config)).logits
        assert not same_at_every_position(changes.last[-1])
    finally:
        changes.remove()
        release_cuda_graphs(rolling)
    theirs = reference.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4,
                                do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=0, atol=1e-4)
    real = attention_mask.bool()
    expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(whole[real], expected[real], rtol=0, atol=1e-4)
    assert all("forward" not in vars(module) for module in rolling.modules())
