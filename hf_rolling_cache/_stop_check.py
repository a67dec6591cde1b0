"""generate's stop check one step late, for decode steps replayed as CUDA graphs.

Transformers' sampling loop asks the device after every step whether every row has finished, and that read waits for
the step's kernels: the GPU then idles while the host prepares the next step (waiting so costs a 7B model on an H100
3-4% of its compiled decode rate at B=1 and B=8). Transformers has the cure, `DeferredStopCheck` (the flag is copied
asynchronously and read one step later; the one extra step it may run is undone with the cache's ``crop(-1)``), and
turns it on for MPS only. A rolling cache rolls one token back exactly (`RollingSlidingWindowCache.crop`), so for a
cache whose decode steps are replayed (`use_cuda_graphs`) we turn it on for CUDA too: the host queues step n + 1
while the GPU runs step n. The tokens, scores and the cache that generate returns are those of the plain loop; a
streamer gets each token one step later.
When an end token stops the generation, the extra step has run: with sampling the random generator has made one
more draw, and stateful logits processors or stopping criteria have seen one more call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.generation import utils as generation_utils

from .cache import RollingSlidingWindowCache

_TRANSFORMERS_CHECK = generation_utils.DeferredStopCheck


def _never(cache: RollingSlidingWindowCache) -> bool:
    return False


class DeferredForReplays(_TRANSFORMERS_CHECK):
    """Transformers' `DeferredStopCheck`, also on CUDA for a rolling cache whose decode steps are CUDA graphs."""

    replays_steps: Callable[[RollingSlidingWindowCache], bool] = staticmethod(_never)  # set by `install`

    @staticmethod
    def is_supported(device: torch.device, cache, cache_is_returned: bool, is_assistant: bool) -> bool:
        replayed = isinstance(cache, RollingSlidingWindowCache) and DeferredForReplays.replays_steps(cache)
        if replayed and not is_assistant and device.type == "cuda":
            return True
        return _TRANSFORMERS_CHECK.is_supported(device, cache, cache_is_returned, is_assistant)


def install(replays_steps: Callable[[RollingSlidingWindowCache], bool]) -> None:
    """Let generate's sampling loop pick `DeferredForReplays` (it looks the class up by name at each call), for the
    caches ``replays_steps`` says are replayed."""
    DeferredForReplays.replays_steps = staticmethod(replays_steps)
    generation_utils.DeferredStopCheck = DeferredForReplays
