"""Shared by the test modules: tiny Mistral pairs (eager reference, rolling) with the same weights, ragged batches,
oracles computed without the package (a layer-0 key, the ring's slot formula) and the article's walkthrough masks."""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (the ring decode) run on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when Triton is imported: before the package is)
from transformers import MistralConfig, MistralForCausalLM
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

import hf_rolling_cache  # noqa: F401  (registers "rolling_xformers")
from hf_rolling_cache.tools.models import ragged_batch, tiny_mistral_config  # noqa: F401  (ragged_batch: for the tests)


def tiny_config(window: int, *, kv_heads: int = 2, heads: int = 4, head_dim: int = 16, layers: int = 2, vocab: int = 97):
    """The tools' small Mistral config (hidden 64), with the sizes the tests vary."""
    return tiny_mistral_config(window, kv_heads=kv_heads, heads=heads, head_dim=head_dim, layers=layers, vocab=vocab)


def model_pair(config: MistralConfig, seed: int = 0) -> tuple[MistralForCausalLM, MistralForCausalLM]:
    """The same random weights twice: Transformers' eager attention (the reference) and rolling_xformers.

    Each model gets its own config object: a model keeps the config it is built from, and the attention
    implementation lives there.
    """
    torch.manual_seed(seed)
    reference = MistralForCausalLM(copy.deepcopy(config)).eval()
    reference.set_attn_implementation("eager")
    rolling = MistralForCausalLM(copy.deepcopy(config)).eval()
    rolling.load_state_dict(reference.state_dict())
    rolling.set_attn_implementation("rolling_xformers")
    return reference, rolling


# The walkthrough of "KV Caching in Mistral with Transformers and xFormers": seqlens [4, 1, 3], W = 3, chunk 2.
SEED_ITERATION_1 = [
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 0, 1, 0],
    [0, 0, 0, 1, 1],
]
# Iteration 2: queries [2, 0, 1] over kv [4, 1, 3]; each query sees itself and the two tokens before it.
SEED_ITERATION_2 = [
    [1, 1, 1, 0, 0, 0, 0, 0],  # seq 0, position 2: positions 0, 1, 2 of its 4 keys
    [0, 1, 1, 1, 0, 0, 0, 0],  # seq 0, position 3: positions 1, 2, 3
    [0, 0, 0, 0, 0, 1, 1, 1],  # seq 2, position 2: its 2 cached + itself
]
# First decode step: a 9-wide mask (3 slots per sequence), the second sequence's third slot still empty.
SEED_DECODE_1 = [
    [1, 1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1],
]


def held_positions(seen: int, slots: int) -> list[int]:
    """Per slot of a ring of ``slots`` slots after positions 0 .. seen-1, the position it holds (-1: none yet): the
    ring formula (position p in slot p % slots, later positions overwriting earlier ones), written out here rather
    than taken from the package."""
    held = [-1] * slots
    for position in range(seen):
        held[position % slots] = position
    return held


def layer0_key(model, token: int, position: int) -> torch.Tensor:
    """The layer-0 key of ``token`` at ``position`` in a Mistral model: it depends on nothing else, so it is an exact
    oracle for what a ring slot holds."""
    with torch.no_grad():
        hidden = model.model.embed_tokens(torch.tensor([[token]]))
        attention = model.model.layers[0].self_attn
        normed = model.model.layers[0].input_layernorm(hidden)
        key = attention.k_proj(normed).view(1, 1, -1, attention.head_dim).transpose(1, 2)  # [1, H_kv, 1, D]
        cos, sin = model.model.rotary_emb(hidden, torch.tensor([[position]]))
        _, key = apply_rotary_pos_emb(key, key, cos, sin)
    return key[0, :, 0]  # [H_kv, D]


def word_tokenizer(vocab_size=97):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]",
                                   padding_side="left")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def next_turn(sequences: torch.Tensor, attention_mask: torch.Tensor, reply: int, seed: int):
    """A conversation's next turn: the first turn's output (``sequences``) with ``reply`` random tokens appended to
    every row, and its mask (the first turn's, then ones): what a chat passes to generate with the same cache."""
    tokens = torch.randint(1, 97, (sequences.shape[0], reply), generator=torch.Generator().manual_seed(seed))
    turn = torch.cat([sequences, tokens], dim=1)
    ones = torch.ones(sequences.shape[0], turn.shape[1] - attention_mask.shape[1], dtype=attention_mask.dtype)
    return turn, torch.cat([attention_mask, ones], dim=1)


@pytest.fixture
def undone_steps(monkeypatch) -> list[int]:
    """The steps generate's step-late stop check undid, one entry per generate call that used it (`_stop_check`)."""
    from hf_rolling_cache import _stop_check

    undone: list[int] = []
    finish = _stop_check.DeferredForReplays.finish

    def recorded(self) -> int:
        undone.append(finish(self))
        return undone[-1]

    monkeypatch.setattr(_stop_check.DeferredForReplays, "finish", recorded)
    return undone


@pytest.fixture(autouse=True)
def compile_errors_raise(monkeypatch):
    """Compiled layers that fail to compile raise in tests (users' runs fall back to eager code): a test of a compiled
    path must not pass by running eagerly."""
    monkeypatch.setattr("hf_rolling_cache._compiled.EAGER_ON_COMPILE_ERROR", False)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's compiled code and counters emptied before and after (the compiled-layer tests count graphs)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """FlexAttention for the compiled prefill on CPU tensors too, counting its calls."""
    from hf_rolling_cache import _flex
    from hf_rolling_cache._compiled_prefill import active

    calls = []
    flex_packed = _flex.flex_packed

    def counted(*args):
        calls.append(args[0].shape[0])
        return flex_packed(*args)

    monkeypatch.setattr("hf_rolling_cache.attention.flex_applies",
                        lambda query, softcap, sinks: active() and softcap is None and sinks is None
                        and not _flex._flex.refused)
    monkeypatch.setattr("hf_rolling_cache.attention.flex_packed", counted)
    return calls


class OnCuda:
    """What `_flex.applies` (or `graphs._compiled_prefill`) reads of a tensor, as if on a GPU."""

    is_cuda = True

    def __init__(self, dtype=torch.bfloat16, shape=(128, 4, 8), device=torch.device("cuda", 0), requires_grad=False):
        self.dtype, self.shape, self.device, self.requires_grad = dtype, shape, device, requires_grad


@pytest.fixture
def compiled_prefill_on_cpu(monkeypatch, flex_on_cpu):
    """``use_cuda_graphs(compile_prefill=True)`` taking forwards of CPU tensors as if on a GPU: their layers
    compiled, their attention FlexAttention's (`flex_on_cpu`: its calls are returned)."""
    from hf_rolling_cache import graphs

    compiled_prefill = graphs._compiled_prefill
    monkeypatch.setattr(graphs, "_compiled_prefill", lambda placement, cache, kwargs, compiled: compiled_prefill(
        placement, cache, {**kwargs, "input_ids": OnCuda(shape=kwargs["input_ids"].shape)}, compiled))
    monkeypatch.setattr(graphs.torch.cuda, "is_current_stream_capturing", lambda: False)
    return flex_on_cpu
