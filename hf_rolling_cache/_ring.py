"""The ring formula: the token at position ``p`` of a sequence lives in slot ``p % window``.

Everything that maps positions to slots goes through these helpers, so the formula is written once.
They work on host ints: the step plan calls them while it builds its index tensors.
"""

from __future__ import annotations


def slot_of(position: int, window: int) -> int:
    """Ring slot of the token at ``position``."""
    return position % window


def cached_count(seen: int, window: int) -> int:
    """How many of a sequence's ``seen`` tokens the ring still holds: the newest ``min(seen, window)``."""
    return min(seen, window)


def unrotated_slots(seen: int, window: int) -> list[int]:
    """Slots of the ring's tokens, oldest first.

    After ``seen`` tokens the ring holds positions ``seen - cached_count .. seen - 1``; reading the slots in this
    order "unrotates" the ring back into sequence order, which a later prefill chunk needs to line its queries up
    with the keys (the seed's iteration 2).
    """
    first = seen - cached_count(seen, window)
    return [slot_of(position, window) for position in range(first, seen)]


def slot_positions(seen: int, window: int) -> list[int]:
    """The position held by each slot after ``seen`` tokens, ``-1`` for a slot never written."""
    held = [-1] * window
    for position in range(seen - cached_count(seen, window), seen):
        held[slot_of(position, window)] = position
    return held
