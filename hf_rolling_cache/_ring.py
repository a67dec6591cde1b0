"""The ring formula: the token at position ``p`` of a sequence lives in slot ``p % slots``.

A ring has ``slots = window`` (the seed layout), or a few more (``window + slack``) when a generation may roll back
up to ``slack + 1`` tokens (assisted decoding): the extra slots keep the tokens a rollback brings back into the
window (the next token's window needs only ``window - 1`` tokens before it, hence the one more).
A global (full-attention) layer is the same formula with no modulus: position ``p`` in slot ``p``.
Everything that maps positions to slots goes through these helpers, so the formula is written once. They work on
host ints and on host tensors of positions: the step plan calls them while it builds its index tensors (and
`contiguous_runs` on those, where a move of tokens is a few stretches of slots: a copy of slices instead of an index
kernel).
"""

from __future__ import annotations

import torch

IntOrTensor = int | torch.Tensor  # the helpers take one position (an int) or many (an int64 tensor)


def slot_of(position: IntOrTensor, slots: int | None) -> IntOrTensor:
    """Slot of the token at ``position``: ``position % slots``, or ``position`` for a global layer (``None``)."""
    return position if slots is None else position % slots


def cached_count(seen: IntOrTensor, window: int | None) -> IntOrTensor:
    """How many of a sequence's ``seen`` tokens the layer still holds: the newest ``min(seen, window)``."""
    if window is None:
        return seen
    return seen.clamp(max=window) if isinstance(seen, torch.Tensor) else min(seen, window)


def slot_positions(seen: int, slots: int) -> list[int]:
    """The position held by each slot of a ring of ``slots`` after ``seen`` tokens, ``-1`` for a slot never
    written."""
    held = [-1] * slots
    for position in range(seen - cached_count(seen, slots), seen):
        held[slot_of(position, slots)] = position
    return held


MAX_RUNS = 4


def contiguous_runs(sources: torch.Tensor, destinations: torch.Tensor) -> tuple[tuple[int, int, int], ...] | None:
    """``(source, destination, length)`` of each stretch where both host index tensors step by one, or None where
    there are more than `MAX_RUNS`."""
    if sources.numel() == 0:
        return ()
    breaks = ((sources.diff() != 1) | (destinations.diff() != 1)).nonzero().flatten() + 1
    if breaks.numel() >= MAX_RUNS:
        return None
    edges = [0, *breaks.tolist(), sources.numel()]
    return tuple((int(sources[a]), int(destinations[a]), b - a) for a, b in zip(edges, edges[1:]))
