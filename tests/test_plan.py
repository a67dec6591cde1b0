"""The step plan: phases, seqlens, slots, and masks that equal an oracle built from token positions alone."""

import itertools
import random

import pytest
import torch

from hf_rolling_cache._plan import Phase, build_plan, query_layout
from hf_rolling_cache._ring import cached_count, slot_of
from tests.conftest import SEED_DECODE_1, SEED_ITERATION_1, SEED_ITERATION_2, held_positions


def grid(plan):
    return plan.dense_mask().exp().round().to(torch.int64).tolist()


def test_seed_walkthrough_plans():
    first = build_plan(window=3, q_length=2, q_seqlens=[2, 1, 2], seen=[0, 0, 0])
    assert first.phase is Phase.PREFILL
    assert first.kv_seqlens == (2, 1, 2)
    assert grid(first) == SEED_ITERATION_1

    second = build_plan(window=3, q_length=2, q_seqlens=[2, 0, 1], seen=first.seen_after)
    assert second.phase is Phase.SUBSEQUENT_PREFILL
    assert second.kv_seqlens == (4, 1, 3)
    assert grid(second) == SEED_ITERATION_2

    decode = build_plan(window=3, q_length=1, q_seqlens=[1, 1, 1], seen=second.seen_after)
    assert decode.phase is Phase.DECODE
    assert decode.seen == (4, 1, 3)  # "the new tokens are #4, #1 and #3"
    assert decode.kv_seqlens == (3, 2, 3)
    assert grid(decode) == SEED_DECODE_1


def test_seed_write_slots():
    decode = build_plan(window=3, q_length=1, q_seqlens=[1, 1, 1], seen=[4, 1, 3])
    indices = decode.indices(torch.device("cpu"))
    # positions 4, 1, 3 go to slot 1 of row 0, slot 1 of row 1, slot 0 of row 2 (flat rows b * 3 + slot)
    assert indices.write_slot.tolist() == [1, 4, 6]
    assert indices.write_source.tolist() == [0, 1, 2]


def _oracle_mask(plan):
    """Allowed iff same sequence and q_pos - W < k_pos <= q_pos, from positions alone."""
    window = plan.window
    queries = [(b, s + i) for b, (n, s) in enumerate(zip(plan.q_seqlens, plan.seen)) for i in range(n)]
    if plan.phase is Phase.DECODE:
        keys = [(b, p) for b, s in enumerate(plan.seen_after) for p in held_positions(s, window)]
    elif plan.phase is Phase.PREFILL:
        keys = queries
    else:
        keys = [
            (b, p)
            for b, (n, s) in enumerate(zip(plan.q_seqlens, plan.seen))
            for p in range(max(0, s - window), s + n)
        ]
    return [
        [int(qb == kb and kp >= 0 and qp - window < kp <= qp) for kb, kp in keys]
        for qb, qp in queries
    ]


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_masks_equal_the_position_oracle(window):
    for q_seqlens, seen in itertools.product([(1, 3, 2), (4, 0, 7), (1, 1, 1), (9, 2, 5)], [(0, 0, 0), (1, 4, 9), (6, 2, 5)]):
        q_length = max(q_seqlens)
        plan = build_plan(window=window, q_length=q_length, q_seqlens=q_seqlens, seen=seen)
        assert grid(plan) == _oracle_mask(plan), (window, q_seqlens, seen, plan.phase)


def test_long_chunk_writes_each_slot_once():
    plan = build_plan(window=3, q_length=8, q_seqlens=[8, 5], seen=[0, 0])
    indices = plan.indices(torch.device("cpu"))
    slots = indices.write_slot.tolist()
    assert len(slots) == len(set(slots)) == 6  # the newest 3 of each sequence
    # sequence 0 keeps positions 5, 6, 7 (packed rows 5, 6, 7) in slots 2, 0, 1
    assert indices.write_source.tolist()[:3] == [5, 6, 7]
    assert slots[:3] == [2, 0, 1]


def test_query_index_skips_padding():
    plan = build_plan(window=4, q_length=3, q_seqlens=[3, 1, 0], seen=[2, 5, 1])
    assert plan.indices(torch.device("cpu")).query_index.tolist() == [0, 1, 2, 5]
    full = build_plan(window=4, q_length=3, q_seqlens=[3, 3], seen=[0, 0])
    assert full.indices(torch.device("cpu")).query_index is None


def test_query_layout_reads_left_padding():
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert query_layout(mask, 3, 2) == ([2, 1, 2], [1, 0, 2])
    assert query_layout(mask[:, -2:], 3, 2) == ([2, 1, 2], None)
    assert query_layout(None, 2, 5) == ([5, 5], None)


def test_query_layout_rejects_right_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="right padded.*padding_side = 'left'"):
        query_layout(mask, 2, 3)


def test_an_all_padding_chunk_plans_nothing():
    """A batch padded to a fixed length can bring a first chunk of padding only: nothing to write or attend."""
    plan = build_plan(window=3, q_length=2, q_seqlens=[0, 0], seen=[1, 1])
    assert plan.num_queries == 0 and plan.seen_after == (1, 1)
    assert plan.indices(torch.device("cpu")).write_slot.numel() == 0


def test_a_hole_is_named_as_a_hole():
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"sequences \[0\] have padding between real tokens"):
        query_layout(mask, 2, 3)


def test_global_layer_plans_keep_every_token_in_order():
    """The walkthrough's batch on a global layer (window None): plain causal masks, slot = position, no wrap."""
    first = build_plan(window=None, capacity=8, q_length=2, q_seqlens=[2, 1, 2], seen=[0, 0, 0])
    assert grid(first) == SEED_ITERATION_1  # with W=3 nothing was windowed yet either
    second = build_plan(window=None, capacity=8, q_length=2, q_seqlens=[2, 0, 1], seen=first.seen_after)
    assert second.kv_seqlens == (4, 1, 3)
    assert grid(second) == [
        [1, 1, 1, 0, 0, 0, 0, 0],  # seq 0, position 2: positions 0..2
        [1, 1, 1, 1, 0, 0, 0, 0],  # seq 0, position 3: all four (no window)
        [0, 0, 0, 0, 0, 1, 1, 1],
    ]
    indices = second.indices(torch.device("cpu"))
    assert indices.gather_slot.tolist() == [0, 1, 8, 16, 17]  # rows b * capacity + position, oldest first
    assert indices.write_slot.tolist() == [2, 3, 18]
    decode = build_plan(window=None, capacity=8, q_length=1, q_seqlens=[1, 1, 1], seen=second.seen_after)
    assert decode.kv_seqlens == (5, 2, 4) and decode.key_span == 5
    assert grid(decode) == [
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0],
    ]
    assert decode.indices(torch.device("cpu")).write_slot.tolist() == [4, 9, 19]
    with pytest.raises(ValueError, match="cannot hold"):
        build_plan(window=None, capacity=4, q_length=1, q_seqlens=[1], seen=[4])


def test_decode_with_slack_attends_to_the_window_only():
    """A ring of window + slack slots after a rollback: slots holding rolled-back drafts and tokens older than the
    window are masked; the others are exactly the window's positions."""
    window, slack = 3, 2
    seen = [9, 4, 1]  # 9 tokens held in a 5-slot ring, then a rollback would leave drafts in slots of 9, 10
    plan = build_plan(window=window, capacity=window + slack, q_length=1, q_seqlens=[1, 1, 1], seen=seen)
    assert plan.phase is Phase.DECODE and plan.key_span == window + slack
    valid = plan.key_padding(torch.device("cpu")).view(3, -1)
    for row, s in enumerate(seen):
        held = held_positions(s + 1, window + slack)  # after this step's write
        expected = [0 <= p and s + 1 - window <= p <= s for p in held]
        assert valid[row].tolist() == expected


@pytest.mark.parametrize("window", [16, None], ids=["ring", "global"])
def test_device_decode_key_lengths_count_the_slots_the_key_mask_opens(window):
    """What a captured step hands xFormers' split-K kernel instead of a mask, for a ring without slack or a global
    layer (whose slots fill in order): per row, the slots its key mask opens, and they are the first ones."""
    from hf_rolling_cache._masks import decode_mask, decode_mask_of
    from hf_rolling_cache._plan import DeviceDecodePlan

    capacity = 16
    cases = (([9, 2, 15, 0], [1, 1, 1, 1]), ([9, 0, 15, 3], [1, 0, 1, 0]), ([40, 16, 17, 1], [1, 1, 0, 1]))
    for seen, real in cases if window else cases[:2]:  # a global layer never holds more than its capacity
        plan = DeviceDecodePlan(window=window, capacity=capacity, seen=torch.tensor(seen), real=torch.tensor(real))
        got = plan.kv_seqlens_on(torch.device("cpu"))
        opened = plan.key_padding(torch.device("cpu")).view(len(seen), capacity)
        prefix = torch.arange(capacity)[None, :] < got[:, None].long()
        assert got.dtype == torch.int32 and torch.equal(opened, prefix), (seen, real)
        mask = decode_mask_of(got, capacity)
        template = decode_mask([capacity] * len(seen), capacity)
        assert mask.k_seqinfo.seqlen is got  # the device tensor itself, read by the kernel at every replay
        assert mask.k_seqinfo.max_seqlen == capacity and mask.k_seqinfo.padding == capacity
        assert torch.equal(mask.q_seqinfo.seqstart, template.q_seqinfo.seqstart)


def per_token_indices(plan):
    """A plan's index lists token by token, from the ring formula on host ints (the plan computes them by tensor
    arithmetic)."""
    ring = plan.capacity if plan.window is not None else None
    starts = [sum(plan.q_seqlens[:b]) for b in range(plan.batch_size)]
    query_index = None
    if any(n != plan.q_length for n in plan.q_seqlens):
        query_index = [b * plan.q_length + column for b, n in enumerate(plan.q_seqlens)
                       for column in range(plan.q_length - n, plan.q_length)]
    write_source, write_slot = [], []
    for b, (n, s, start) in enumerate(zip(plan.q_seqlens, plan.seen, starts)):
        for i in range(n - cached_count(n, ring), n):
            write_source.append(start + i)
            write_slot.append(b * plan.capacity + slot_of(s + i, ring))
    lists = dict(query_index=query_index, write_source=write_source, write_slot=write_slot,
                 gather_slot=None, gather_dest=None, new_dest=None)
    if plan.phase is Phase.SUBSEQUENT_PREFILL:
        gather_slot, gather_dest, new_dest, kv_start = [], [], [], 0
        for b, (n, s) in enumerate(zip(plan.q_seqlens, plan.seen)):
            held = range(s - cached_count(s, plan.window), s)  # the window's positions, oldest first
            gather_slot += [b * plan.capacity + slot_of(position, ring) for position in held]
            gather_dest += range(kv_start, kv_start + len(held))
            new_dest += range(kv_start + len(held), kv_start + len(held) + n)
            kv_start += len(held) + n
        lists.update(gather_slot=gather_slot, gather_dest=gather_dest, new_dest=new_dest)
    return lists


def test_index_lists_equal_the_per_token_formula():
    """Every index list of random plans (rings with and without slack, global layers, padding, long chunks, every
    phase) equals the ring formula applied token by token."""
    rng = random.Random(7)
    for _ in range(300):
        batch = rng.randint(1, 4)
        window = rng.choice([1, 2, 3, 5, 8, None])
        q_length = rng.choice([1, 2, 3, 7, 12])
        q_seqlens = [rng.choice([q_length, rng.randint(0, q_length)]) for _ in range(batch)]
        seen = [rng.choice([0, rng.randint(0, 20)]) for _ in range(batch)]
        capacity = (max(s + n for s, n in zip(seen, q_seqlens)) + rng.randint(0, 3) if window is None
                    else window + rng.choice([0, 0, 2]))
        plan = build_plan(window=window, q_length=q_length, q_seqlens=q_seqlens, seen=seen, capacity=capacity)
        indices = plan.indices(torch.device("cpu"))
        for name, expected in per_token_indices(plan).items():
            got = getattr(indices, name)
            assert (None if got is None else got.tolist()) == expected, (name, window, capacity, q_seqlens, seen)


def test_index_lists_stay_on_the_host_under_a_default_device():
    """A user's ``torch.set_default_device`` (here the meta device, which holds no values) does not move the plan's
    host arithmetic: its index lists are real CPU tensors, equal to those planned without it."""
    options = dict(window=4, q_length=3, q_seqlens=[3, 1], seen=[6, 2])
    with torch.device("meta"):
        indices = build_plan(**options).indices(torch.device("cpu"))
    expected = build_plan(**options).indices(torch.device("cpu"))
    for name in ("query_index", "write_source", "write_slot", "gather_slot", "gather_dest", "new_dest"):
        assert getattr(indices, name).device.type == "cpu"
        assert torch.equal(getattr(indices, name), getattr(expected, name)), name
    assert indices.held_runs == expected.held_runs and indices.write_runs == expected.write_runs


def moved_by_index(sources, destinations, rows):
    out = torch.full((rows,), -1, dtype=torch.long)
    out[destinations] = sources
    return out


def moved_by_runs(runs, rows):
    out = torch.full((rows,), -1, dtype=torch.long)
    for source, destination, length in runs:
        out[destination:destination + length] = torch.arange(source, source + length)
    return out


RUN_PLANS = [  # one sequence (a ring's wrap: two stretches), several, a long chunk that overwrites, a global layer,
    # a first chunk, a ring with slack
    dict(window=5, q_length=4, q_seqlens=[4], seen=[7]),
    dict(window=5, q_length=7, q_seqlens=[7, 3], seen=[0, 0]),
    dict(window=4, q_length=3, q_seqlens=[3], seen=[9], capacity=6),
    dict(window=5, q_length=5, q_seqlens=[5], seen=[10]),
    dict(window=4, q_length=9, q_seqlens=[9], seen=[6]),
    dict(window=3, q_length=2, q_seqlens=[2, 0, 1], seen=[2, 1, 2]),
    dict(window=6, q_length=3, q_seqlens=[3, 3, 2, 3], seen=[4, 9, 1, 13]),
    dict(window=None, q_length=3, q_seqlens=[3, 2], seen=[5, 4], capacity=12),
]


@pytest.mark.parametrize("options", RUN_PLANS)
def test_contiguous_runs_move_exactly_what_the_index_lists_move(options):
    """The slice copies of a plan (a ring write, the held tokens and the chunk's into the packed keys) put every
    row where the index kernels put it; where there are more stretches than `MAX_RUNS`, there are none."""
    from hf_rolling_cache._ring import MAX_RUNS

    plan = build_plan(**options)
    indices = plan.indices(torch.device("cpu"))
    capacity_rows = plan.batch_size * plan.capacity
    moves = [(indices.write_runs, indices.write_source, indices.write_slot, capacity_rows)]
    if plan.phase is Phase.SUBSEQUENT_PREFILL:
        moves += [(indices.held_runs, indices.gather_slot, indices.gather_dest, plan.num_keys),
                  (indices.new_runs, torch.arange(plan.num_queries), indices.new_dest, plan.num_keys)]
    for runs, sources, destinations, rows in moves:
        stretches = 1 + int(((sources.diff() != 1) | (destinations.diff() != 1)).sum()) if len(sources) else 0
        if stretches > MAX_RUNS:
            assert runs is None
        else:
            assert runs is not None and len(runs) == stretches
            assert torch.equal(moved_by_runs(runs, rows), moved_by_index(sources, destinations, rows))
    if plan.batch_size == 1:
        assert indices.write_runs is not None and len(indices.write_runs) <= 2
