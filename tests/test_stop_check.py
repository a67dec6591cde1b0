"""generate's stop check one step late (`_stop_check`): who gets it, and that its undone extra step leaves the
tokens, scores and cache of the plain loop."""

import copy
import warnings

import torch
from transformers import DynamicCache
from transformers.generation import utils as generation_utils

from hf_rolling_cache import RollingSlidingWindowCache, release_cuda_graphs, use_cuda_graphs
from hf_rolling_cache import _stop_check
from hf_rolling_cache._decode_graph import EagerSteps
from tests.conftest import model_pair, next_turn, ragged_batch, tiny_config

WINDOW = 4


def ran_on(model) -> RollingSlidingWindowCache:
    """A cache after one forward of ``model`` (its prefill)."""
    cache = RollingSlidingWindowCache(config=model.config)
    input_ids, attention_mask = ragged_batch([5, 2])
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
    return cache


def test_deferred_only_for_a_cache_replayed_on_cuda(monkeypatch):
    monkeypatch.setattr(generation_utils, "DeferredStopCheck", generation_utils.DeferredStopCheck)  # put back after
    _, model = model_pair(tiny_config(WINDOW))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    supported = _stop_check.DeferredForReplays.is_supported
    assert not supported(cuda, ran_on(model), True, False)  # eager steps: the host is the bottleneck anyway
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here (use_cuda_graphs says so once per process)
        use_cuda_graphs(model)
    assert generation_utils.DeferredStopCheck is _stop_check.DeferredForReplays
    replayed = ran_on(model)
    assert supported(cuda, replayed, True, False)
    assert not supported(cuda, replayed, True, True)  # an assistant's own loop
    assert not supported(cpu, replayed, True, False)  # no events on the CPU
    assert not supported(cuda, DynamicCache(config=model.config), True, False)  # Transformers' own decision
    release_cuda_graphs(model)
    assert not supported(cuda, replayed, True, False)  # the model that ran on it replays no more
    use_cuda_graphs(model)
    replayed.decode_graph = EagerSteps(model.forward)  # its step was found uncapturable
    assert not supported(cuda, replayed, True, False)
    replayed.reset()
    assert not supported(cuda, replayed, True, False)
    release_cuda_graphs(model)


class _HostEvent:
    """Stands in for torch.Event on the CPU (which has no events): the CPU's work is done when it returns."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass


def test_one_step_late_stop_gives_the_plain_loops_tokens_scores_and_cache(monkeypatch, undone_steps):
    """The deferred check on the CPU (host events stand in for CUDA's): rows stop at an end token well past the
    window, the loop runs one step more, Transformers undoes it with crop(-1), and everything generate returns,
    the cache's next turn included, is the plain loop's (and Transformers' own tokens)."""
    reference, model = model_pair(tiny_config(WINDOW))
    input_ids, attention_mask = ragged_batch([9, 3])
    options = dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=0,
                   output_scores=True, return_dict_in_generate=True)
    free = reference.generate(**options, max_new_tokens=12)
    # each row ends at a token it generates 8 or 10 steps in (past its window), if not at the other one before
    eos = [int(free.sequences[0, -5]), int(free.sequences[1, -3])]
    options.update(eos_token_id=eos, max_new_tokens=30)
    expected = reference.generate(**options)
    assert expected.sequences.shape[1] < input_ids.shape[1] + 30, "the end token did not stop the generation"
    plain_cache = RollingSlidingWindowCache(config=model.config)
    plain = model.generate(**options, past_key_values=plain_cache)

    monkeypatch.setattr(torch, "Event", _HostEvent)
    monkeypatch.setattr(generation_utils, "DeferredStopCheck", _stop_check.DeferredForReplays)
    monkeypatch.setattr(_stop_check.DeferredForReplays, "is_supported", staticmethod(lambda *args, **kwargs: True))
    deferred_cache = RollingSlidingWindowCache(config=model.config)
    deferred = model.generate(**options, past_key_values=deferred_cache)

    assert undone_steps == [1], "the loop should have run one step past the end and undone it"
    assert torch.equal(deferred.sequences, expected.sequences)
    assert torch.equal(deferred.sequences, plain.sequences)
    for ours, theirs in zip(deferred.scores, plain.scores, strict=True):
        assert torch.equal(ours, theirs)
    assert deferred_cache.seen == plain_cache.seen and deferred_cache.get_seq_length() == plain_cache.get_seq_length()

    turn, turn_mask = next_turn(deferred.sequences, torch.ones_like(deferred.sequences), reply=3, seed=1)
    turn_mask[:, : attention_mask.shape[1]] = attention_mask
    follow = dict(input_ids=turn, attention_mask=turn_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_next = reference.generate(**follow)
    assert torch.equal(model.generate(**follow, past_key_values=deferred_cache), expected_next)
    assert torch.equal(model.generate(**copy.deepcopy(follow), past_key_values=plain_cache), expected_next)
