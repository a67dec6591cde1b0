"""The ring formula: the token at position ``p`` of a sequence lives in slot ``p % slots``.

A ring has ``slots = window`` (the seed layout), or a few more (``window + slack``) when a generation may roll back
up to ``slack + 1`` tokens (assisted decoding): the extra slots keep the tokens a rollback brings back into the
window (the next token's window needs only ``window - 1`` tokens before it, hence the one more).
A global (full-attention) layer is the same formula with no modulus: position ``p`` in slot ``p``.
Everything that maps positions to slots goes through these helpers, so the formula is written once. They work on
host ints and on host tensors of positions: `index_lists` applies them to a whole batch for the step plan, and
`contiguous_runs` finds where a move of tokens is a few stretches of slots (a copy of slices instead of an index
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


def _concatenated_ranges(lengths: torch.Tensor, firsts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``firsts[b] .. firsts[b] + lengths[b] - 1`` for every ``b``, concatenated, and the ``b`` of each value."""
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device="cpu"), lengths)
    begins = torch.cumsum(lengths, 0) - lengths
    return firsts[owner] + torch.arange(owner.numel(), device="cpu") - begins[owner], owner


def index_lists(*, window: int | None, capacity: int, q_length: int, q_seqlens: tuple[int, ...],
                seen: tuple[int, ...], decode: bool, later_chunk: bool) -> dict[str, torch.Tensor | None]:
    """A step plan's index lists (``_plan.PlanIndices`` names them) as int64 host tensors: which packed rows are real
    queries, which go to which of the flat ``[B * capacity]`` storage rows, and, for a later chunk, which storage
    rows hold the window before it (oldest first: the ring unrotated) and where they and the chunk go among the
    packed keys. By whole-tensor arithmetic: a chunk of thousands of tokens costs a few tensor operations, not a
    Python loop per token (the GPU waits for this at every chunk)."""
    ring = capacity if window is not None else None  # the slot modulus: the ring's size, or none (a global layer)
    host = dict(dtype=torch.long, device="cpu")  # (whatever default device the user set)
    held = torch.tensor(seen, **host)
    rows = torch.arange(held.numel(), **host) * capacity  # each sequence's first storage row
    if decode:  # one token a sequence, each in its row's next slot
        assert q_length == 1 and all(n == 1 for n in q_seqlens), "a decode step brings one token a sequence"
        return dict(query_index=None, write_source=torch.arange(held.numel(), **host),
                    write_slot=rows + slot_of(held, ring), gather_slot=None, gather_dest=None, new_dest=None)
    n = torch.tensor(q_seqlens, **host)
    starts = torch.cumsum(n, 0) - n  # where each sequence's tokens start among the packed queries
    query_index = None
    if any(count != q_length for count in q_seqlens):
        query_index, _ = _concatenated_ranges(n, torch.arange(n.numel(), **host) * q_length + q_length - n)
    # Only the newest `ring` tokens of a long chunk are kept: writing more would put two tokens in one slot.
    kept = cached_count(n, ring)
    write_source, owner = _concatenated_ranges(kept, starts + n - kept)
    write_slot = rows[owner] + slot_of(held[owner] + write_source - starts[owner], ring)
    gather_slot = gather_dest = new_dest = None
    if later_chunk:
        cached = cached_count(held, window)  # the window's tokens before this chunk, oldest first (unrotated)
        kv_starts = torch.cumsum(cached + n, 0) - (cached + n)
        gather_dest, owner = _concatenated_ranges(cached, kv_starts)
        gather_slot = rows[owner] + slot_of(held[owner] - cached[owner] + gather_dest - kv_starts[owner], ring)
        new_dest, _ = _concatenated_ranges(n, kv_starts + cached)
    return dict(query_index=query_index, write_source=write_source, write_slot=write_slot, gather_slot=gather_slot,
                gather_dest=gather_dest, new_dest=new_dest)
