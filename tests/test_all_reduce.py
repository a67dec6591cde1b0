"""The one-shot all-reduce stand-in (`_all_reduce`): what it hands to torch.distributed unchanged. Its kernel runs on
two GPUs only (tests/test_tensor_parallel.py asserts the captured steps took it and still give one GPU's answer)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from hf_rolling_cache import _all_reduce


class RecordingDist:
    """A stand-in for torch.distributed that records the all-reduces it is handed."""

    ReduceOp = types.SimpleNamespace(SUM="sum", MAX="max")
    group = types.SimpleNamespace(WORLD=types.SimpleNamespace(group_name="world"))

    def __init__(self, world_size: int = 2) -> None:
        self.calls: list[tuple] = []
        self.world_size = world_size

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.calls.append((tensor, op, group, async_op))
        return "handle" if async_op else None

    def get_world_size(self, group=None) -> int:
        return self.world_size

    def barrier(self) -> str:
        return "barrier"


@pytest.mark.parametrize(
    "tensor, options",
    [
        (torch.ones(8), {}),  # on the CPU
        (torch.ones(8), {"op": "max"}),  # not a sum
        (torch.ones(8), {"async_op": True}),  # handed back to the caller to wait on
    ],
    ids=["cpu", "max", "async"],
)
def test_what_cannot_go_one_shot_goes_to_torch_distributed_unchanged(tensor, options):
    dist = RecordingDist()
    proxy = _all_reduce._DistWithOneShot(dist, _all_reduce._Buffers())
    result = proxy.all_reduce(tensor, **options)
    assert len(dist.calls) == 1
    handed, op, group, async_op = dist.calls[0]
    assert handed is tensor and group is None
    assert op == options.get("op", "sum") and async_op == options.get("async_op", False)
    assert result == ("handle" if async_op else None)
    assert proxy.barrier() == "barrier"  # everything else is torch.distributed's own


def test_world_sizes_and_messages_the_kernel_is_not_built_for_stay_with_nccl():
    """Decided before any buffer is made: a group of 3, a message over 1 MiB or not a multiple of 16 bytes."""
    for world_size, numel in ((3, 8), (2, (1 << 20) // 4 + 4), (2, 3)):
        dist = RecordingDist(world_size)
        proxy = _all_reduce._DistWithOneShot(dist, _all_reduce._Buffers())
        fake_cuda = types.SimpleNamespace(is_cuda=True, is_contiguous=lambda: True, dtype=torch.float32,
                                          numel=lambda n=numel: n, element_size=lambda: 4, data_ptr=lambda: 0)
        assert proxy._one_shot_view(fake_cuda, None, None, False) is None


def test_outside_a_distributed_run_nothing_is_swapped():
    from transformers.distributed import tensor_parallel

    held = tensor_parallel.dist
    with _all_reduce.one_shot_all_reduces():
        assert tensor_parallel.dist is held
    with _all_reduce.nccl_only(), _all_reduce.one_shot_all_reduces():
        assert tensor_parallel.dist is held
    assert not _all_reduce._NCCL_ONLY  # put back


def test_a_shared_buffer_is_made_once_at_full_size_and_never_replaced(monkeypatch):
    """A captured graph keeps the buffer's address: a later, larger message must reuse it, not free it for a new
    one. Inside a capture no buffer can be made (the caller then keeps NCCL)."""
    made = []

    def allocate(self, group_name, like, agree):
        made.append((group_name, like.dtype))
        return torch.zeros(_all_reduce._LARGEST // like.element_size(), dtype=like.dtype)

    monkeypatch.setattr(_all_reduce._Buffers, "_allocate", allocate)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (a CPU build cannot say)
    buffers = _all_reduce._Buffers()
    everyone = lambda ok: ok  # noqa: E731 - one rank
    small = buffers.view("world", torch.ones(2, 4), everyone)
    large = buffers.view("world", torch.ones(64, 1024), everyone)
    assert small.shape == (2, 4) and large.shape == (64, 1024)
    assert small.data_ptr() == large.data_ptr() and made == [("world", torch.float32)]
    buffers.view("world", torch.ones(8, dtype=torch.bfloat16), everyone)  # another dtype: its own buffer
    assert made == [("world", torch.float32), ("world", torch.bfloat16)]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert buffers.view("tp", torch.ones(4), everyone) is None and len(made) == 2
    assert buffers.view("world", torch.ones(4), everyone).data_ptr() == small.data_ptr()  # made before: served


@pytest.mark.parametrize("here, elsewhere", [(True, True), (True, False), (False, True)])
def test_ranks_agree_on_a_shared_buffer_before_the_rendezvous(here, elsewhere, monkeypatch):
    """The rendezvous is collective: a rank that could not allocate (or whose peer could not) must not enter it,
    and then every rank keeps NCCL, so no rank waits for a peer that sums elsewhere."""
    from torch.distributed import _symmetric_memory as symm_mem

    calls = []

    def empty(numel, dtype, device):
        if not here:
            raise RuntimeError("no peer access")
        return torch.zeros(numel, dtype=dtype)

    monkeypatch.setattr(symm_mem, "empty", empty)
    monkeypatch.setattr(symm_mem, "rendezvous", lambda buffer, group_name: calls.append("rendezvous"))
    monkeypatch.setattr(symm_mem, "enable_symm_mem_for_group", lambda group_name: None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    asked = []

    def agree(ok):
        asked.append(ok)
        return ok and elsewhere

    buffers = _all_reduce._Buffers()
    with pytest.warns(UserWarning) if not (here and elsewhere) else contextlib.nullcontext():
        shared = buffers.view(f"group-{here}-{elsewhere}", torch.ones(4), agree)
    assert asked == [here]  # every rank asks, whether or not it could allocate
    if here and elsewhere:
        assert shared is not None and calls == ["rendezvous"] and buffers.unavailable is None
    else:
        assert shared is None and calls == [] and buffers.unavailable  # NCCL from now on, on every rank
        assert ("no peer access" in buffers.unavailable) == (not here)


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Our product kernel on CPU tensors too (Triton's interpreter), as on CUDA."""
    from hf_rolling_cache import _kernels

    pytest.importorskip("hf_rolling_cache._narrow_products")
    monkeypatch.setattr(_kernels._narrow_products, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", False)


def summed_with(monkeypatch, dist, input, weight, launch):
    """`summed_product` as a row-parallel layer calls it, with Transformers' module seeing ``dist``."""
    from transformers.distributed import tensor_parallel

    monkeypatch.setattr(tensor_parallel, "dist", dist)
    return _all_reduce.summed_product(input, weight, launch, "group")


@pytest.mark.parametrize("kernel", [True, False], ids=["our-kernel", "f-linear"])
def test_a_row_parallel_product_is_written_into_the_shared_buffer_and_summed_from_there(
    monkeypatch, kernel_on_cpu, kernel
):
    """With the one-shot stand-in in place: the product lands in the shared buffer (straight from our kernel, or
    copied from ``F.linear`` when the kernel does not apply), and the one-shot sum of that buffer is the result."""
    from hf_rolling_cache._narrow_products import launch_for

    torch.manual_seed(0)
    input, weight = torch.randn(3, 128), torch.randn(64, 128)
    launch = launch_for(weight) if kernel else None
    assert (launch is not None) == kernel
    shared = torch.full((3 * 64 + 8,), float("nan"))
    proxy = _all_reduce._DistWithOneShot(RecordingDist(), _all_reduce._Buffers())
    monkeypatch.setattr(proxy, "_one_shot_view", lambda tensor, *args: (shared[: tensor.numel()].view_as(tensor), "g"))
    sums = []

    def one_shot(buffer, group_name, out):  # the other rank's part: twice ours
        sums.append(buffer.clone())
        out.copy_(3 * buffer)

    monkeypatch.setattr(_all_reduce, "_one_shot", one_shot)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (a CPU build has no CUDA)
    got = summed_with(monkeypatch, proxy, input, weight, launch)
    expected = torch.nn.functional.linear(input, weight)
    torch.testing.assert_close(sums[0].view(3, 64), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, 3 * expected, rtol=1e-5, atol=1e-5)
    assert not proxy._dist.calls  # nothing went to NCCL


def test_without_the_stand_in_a_row_parallel_product_is_all_reduced_by_torch_distributed(monkeypatch, kernel_on_cpu):
    """Outside a captured step (Transformers' module holding torch.distributed itself) or where the one-shot does
    not apply: the product, then ``all_reduce`` in place on the layer's group, as Transformers' forward does."""
    from hf_rolling_cache._narrow_products import launch_for

    input, weight = torch.randn(2, 1, 128), torch.randn(64, 128)
    for dist in (RecordingDist(), _all_reduce._DistWithOneShot(RecordingDist(), _all_reduce._Buffers())):
        got = summed_with(monkeypatch, dist, input, weight, launch_for(weight))
        calls = dist.calls if isinstance(dist, RecordingDist) else dist._dist.calls
        assert len(calls) == 1 and calls[0][0] is got and calls[0][2] == "group"
        torch.testing.assert_close(got, torch.nn.functional.linear(input, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("buildable", [True, False], ids=["kernel", "kernel-cannot-be-built"])
def test_after_the_first_sum_of_a_step_products_are_pushed_and_summed_where_they_land(
    monkeypatch, kernel_on_cpu, buildable
):
    """Sums after a step's first (`step_begins`) go as pushed sums (`_pushed_sums`): our product stored into the
    other rank's landing region too, and the other's part (landed in ours) added. The step's first sum stays
    one-shot: its barriers keep the next step's parts from landing early; outside a step nothing is pushed. Where
    our kernel cannot be built (on this rank, after the other may have pushed), the part is pushed all the same."""
    from hf_rolling_cache import _kernels
    from hf_rolling_cache import _pushed_sums
    from hf_rolling_cache._narrow_products import launch_for

    torch.manual_seed(1)
    input, weight = torch.randn(2, 128), torch.randn(64, 128)
    launch = launch_for(weight)  # (taken when the step's modules were swapped in, before any build failed)
    theirs_part = torch.randn(2, 64)
    proxy = _all_reduce._DistWithOneShot(RecordingDist(), _all_reduce._Buffers())
    shared = torch.zeros(2 * 64)
    monkeypatch.setattr(proxy, "_one_shot_view", lambda tensor, *args: (shared[: tensor.numel()].view_as(tensor), "g"))
    one_shots = []
    monkeypatch.setattr(_all_reduce, "_one_shot", lambda buffer, name, out: one_shots.append(out.copy_(2 * buffer)))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    regions = []

    class Landed:  # the other rank's part already in our landing region; theirs still empty
        def regions(self, group_name, like, agree):
            mine = theirs_part.clone().view(torch.int32)
            theirs = torch.full_like(mine, _pushed_sums.negative_zero(like.dtype))
            regions.append((theirs, mine))
            return theirs, mine

        def step_begins(self):
            regions.clear()

    proxy.landings = Landed()
    monkeypatch.setattr(_all_reduce, "_PROXIES", [proxy])
    group = types.SimpleNamespace(group_name="g")
    expected = torch.nn.functional.linear(input, weight)
    from transformers.distributed import tensor_parallel

    monkeypatch.setattr(tensor_parallel, "dist", proxy)
    for _ in range(2):  # outside a step (no `step_begins` yet): one-shot
        _all_reduce.summed_product(input, weight, launch, group)
    assert len(one_shots) == 2 and not regions
    one_shots.clear()
    _all_reduce.step_begins()
    first = _all_reduce.summed_product(input, weight, launch, group)
    monkeypatch.setattr(_kernels._narrow_products, "unbuildable", not buildable)
    assert len(one_shots) == 1 and not regions  # the step's first: one-shot
    second = _all_reduce.summed_product(input, weight, launch, group)
    assert len(one_shots) == 1 and len(regions) == 1  # then pushed
    torch.testing.assert_close(first, 2 * expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected + theirs_part, rtol=1e-5, atol=1e-5)
    theirs, mine = regions[0]
    torch.testing.assert_close(theirs.view(torch.float32), expected, rtol=1e-5, atol=1e-5)  # pushed to the other
    assert (mine == _pushed_sums.negative_zero(torch.float32)).all()  # our landing region cleared again
    _all_reduce.step_begins()
    _all_reduce.summed_product(input, weight, launch, group)
    assert len(one_shots) == 2  # a new step: its first sum one-shot again


def test_a_failed_step_leaves_no_landing_buffer_to_be_read_again(monkeypatch):
    """A step that raises inside the captured steps' block may have pushed parts whose sums never ran: later sums
    would take them for the other rank's. Its landing buffers are dropped (every later sum one-shot), and outside
    the block no sum is counted as a step's."""
    from hf_rolling_cache import _pushed_sums

    proxy = _all_reduce._DistWithOneShot(RecordingDist(), _all_reduce._Buffers())
    proxy.landings = _pushed_sums.Landings()
    monkeypatch.setattr(_all_reduce, "_PROXIES", [proxy])
    monkeypatch.setattr(_all_reduce, "_dist_with_one_shot", lambda dist: proxy)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with _all_reduce.one_shot_all_reduces():
        _all_reduce.step_begins()
        assert proxy.position == 0
    assert proxy.position is None and proxy.landings.unavailable is None  # a block that ended well
    with pytest.raises(RuntimeError, match="a failing step"), _all_reduce.one_shot_all_reduces():
        _all_reduce.step_begins()
        raise RuntimeError("a failing step")
    assert proxy.position is None
    assert "failed" in proxy.landings.unavailable
    assert proxy.landings.regions("g", torch.zeros(4), lambda ok: ok) is None
