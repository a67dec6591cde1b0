"""The ring formula: the token at position ``p`` of a sequence lives in slot ``p % window``.

Everything that maps positions to slots goes through these helpers, so the formula is written once. A global
(full-attention) layer is the same formula with no window: position ``p`` in slot ``p``, never overwritten.
They work on host ints: the step plan calls them while it builds its index tensors.
"""

from __future__ import annotations


def slot_of(position: int, window: int | None) -> int:
    """Slot of the token at ``position``: ``position % window``, or ``position`` for a global layer."""
    return position if window is None else position % window


def cached_count(seen: int, window: int | None) -> int:
    """How many of a sequence's ``seen`` tokens the layer still holds: the newest ``min(seen, window)``."""
    return seen if window is None else min(seen, window)


def unrotated_slots(seen: int, window: int | None) -> list[int]:
    """Slots of the held tokens, oldest first.

    After ``seen`` tokens the ring holds positions ``seen - cached_count .. seen - 1``; reading the slots in this
    order "unrotates" the ring back into sequence order, which a later prefill chunk needs to line its queries up
    with the keys (the walkthrough's iteration 2).
    """
    first = seen - cached_count(seen, window)
    return [slot_of(position, window) for position in range(first, seen)]


def slot_positions(seen: int, window: int) -> list[int]:
    """The position held by each slot of a ring after ``seen`` tokens, ``-1`` for a slot never written."""
    held = [-1] * window
    for position in range(seen - cached_count(seen, window), seen):
        held[slot_of(position, window)] = position
    return held
