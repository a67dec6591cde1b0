from hf_rolling_cache._ring import cached_count, slot_of, slot_positions, unrotated_slots


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


def test_slot_positions_match_the_seed():
    # seed: 5 tokens of the first sequence with W=3 -> [3, 4, 2]; 2 tokens of the second -> [0, 1, -1]
    assert slot_positions(5, 3) == [3, 4, 2]
    assert slot_positions(2, 3) == [0, 1, -1]
    assert slot_positions(0, 3) == [-1, -1, -1]
    assert slot_positions(6, 3) == [3, 4, 5]
