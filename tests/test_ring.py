import torch

from hf_rolling_cache._plan import build_plan
from hf_rolling_cache._ring import cached_count, slot_of, slot_positions


def unrotated_slots(seen: int, window: int) -> list[int]:
    """The slots a later chunk of one sequence reads its held keys from, oldest first, as its plan says."""
    plan = build_plan(window=window, q_length=2, q_seqlens=[2], seen=[seen])
    gather = plan.indices(torch.device("cpu")).gather_slot
    return [] if gather is None else gather.tolist()


def test_slot_of_wraps_every_window():
    window = 4
    assert [slot_of(p, window) for p in range(10)] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_unrotated_before_the_ring_fills():  # pos < W
    assert unrotated_slots(0, 4) == []
    assert unrotated_slots(3, 4) == [0, 1, 2]
    assert cached_count(3, 4) == 3


def test_unrotated_when_full_exactly():  # pos == kW: the oldest token sits in slot 0 again
    assert unrotated_slots(4, 4) == [0, 1, 2, 3]
    assert unrotated_slots(8, 4) == [0, 1, 2, 3]


def test_unrotated_after_wrapping():  # pos > W: oldest first, starting after the newest slot
    # after 6 tokens the ring holds positions 2..5 in slots 2, 3, 0, 1
    assert unrotated_slots(6, 4) == [2, 3, 0, 1]
    assert cached_count(6, 4) == 4


def test_the_formula_takes_tensors_of_positions():
    positions = torch.tensor([0, 3, 4, 9])
    assert slot_of(positions, 4).tolist() == [slot_of(p, 4) for p in positions.tolist()]
    assert cached_count(positions, 4).tolist() == [0, 3, 4, 4]
    assert slot_of(positions, None) is positions and cached_count(positions, None) is positions


def test_slot_positions_match_the_seed():
    # seed: 5 tokens of the first sequence with W=3 -> [3, 4, 2]; 2 tokens of the second -> [0, 1, -1]
    assert slot_positions(5, 3) == [3, 4, 2]
    assert slot_positions(2, 3) == [0, 1, -1]
    assert slot_positions(0, 3) == [-1, -1, -1]
    assert slot_positions(6, 3) == [3, 4, 5]
