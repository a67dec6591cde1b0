"""A one-shot all-reduce over symmetric memory for the all-reduces a tensor-parallel decode step captures.

Under Transformers' tensor parallelism (``tp_plan``) every decoder layer sums its row-parallel products across the
GPUs twice (attention output, MLP output): 64 all-reduces of a few KB in one 7B decode step. NCCL's all-reduce
takes ~20 us at that size, about as long as the half of a layer's weights each GPU reads. PyTorch's symmetric
memory has a one-shot all-reduce for such small sums: each GPU copies its part into a buffer every GPU of the group
can read over NVLink (peer-to-peer, no multicast), and one kernel, with a barrier on each side, sums the parts of all
GPUs in rank order, so every rank gets the same bits. A CUDA graph captures both like any other kernels.

`one_shot_all_reduces` puts it in place of ``torch.distributed.all_reduce`` for Transformers' tensor-parallel layers
while a decode step is warmed up and captured; an all-reduce it does not fit (another op, an async one, a dtype
other than bf16/fp32, a group of other than 2, 4 or 8 ranks, a message over 1 MiB, or a machine where the buffers
cannot be shared) goes to ``torch.distributed`` as before.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable

import torch

_LARGEST = 1 << 20  # bytes: each shared buffer's size; beyond it NCCL's ring is as fast
_WORLD_SIZES = (2, 4, 8)  # the group sizes taken (the ones measured and tested are 2)


class _Buffers:
    """One shared buffer per (group, device, dtype), of the largest message taken (`_LARGEST`), rendezvoused once
    and never replaced: a captured graph keeps the buffer's address, so one made later for a larger message must not
    free it. Every all-reduce of a step reuses it (the kernel's closing barrier keeps the next one from writing
    while a peer still reads)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self.unavailable: str | None = None  # why this process cannot share buffers (then: NCCL throughout)

    def view(self, group_name: str, like: torch.Tensor, agree: Callable[[bool], bool]) -> torch.Tensor | None:
        """A view of the shared buffer shaped like ``like``, or None if there is none yet and one cannot be made
        now (inside a capture, or on some rank). ``agree(ok)`` tells every rank of the group whether all are ok."""
        key = (group_name, like.device, like.dtype)
        held = self._held.get(key)
        if held is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            held = self._allocate(group_name, like, agree)
            if held is None:
                return None
            self._held[key] = held
        return held[: like.numel()].view(like.shape)

    def _allocate(self, group_name: str, like: torch.Tensor, agree: Callable[[bool], bool]) -> torch.Tensor | None:
        """Every rank allocates, then all agree before the rendezvous (collective): a rank that failed alone would
        leave the others waiting there, or later in the kernel's barrier while it sums over NCCL."""
        from torch.distributed import _symmetric_memory as symm_mem

        buffer, reason = None, "another rank of the group could not allocate a shared buffer"
        try:
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before rendezvous in older PyTorch
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    symm_mem.enable_symm_mem_for_group(group_name)
            buffer = symm_mem.empty(_LARGEST // like.element_size(), dtype=like.dtype, device=like.device)
        except Exception as error:  # no peer access, a PyTorch without symmetric memory: NCCL as before
            reason = f"{type(error).__name__}: {error}"
        if agree(buffer is not None):
            try:
                symm_mem.rendezvous(buffer, group_name)
                return buffer
            except Exception as error:  # (a rendezvous that fails on one rank only can still hang the others)
                reason = f"{type(error).__name__}: {error}"
        self.unavailable = reason
        _warn_unavailable(reason)
        return None


@functools.cache
def _warn_unavailable(reason: str) -> None:
    warnings.warn(
        "use_cuda_graphs: tensor-parallel decode steps use NCCL's all-reduce (symmetric memory is not available "
        f"here: {reason}).",
        stacklevel=2,
    )


class _DistWithOneShot:
    """``torch.distributed`` as Transformers' tensor-parallel module sees it, with `all_reduce` going one-shot
    where it can."""

    def __init__(self, dist, buffers: _Buffers) -> None:
        self._dist = dist
        self._buffers = buffers
        self.captured = 0  # one-shot all-reduces recorded into a CUDA graph (what a replay then runs)
        self.pushed = 0  # of which pushed sums (`_pushed_sums`)
        self.position = None  # this step's row-parallel sums so far (`summed_product`); None outside a step
        self.landings = None  # `_pushed_sums.Landings`, made on the first pushed sum

    def __getattr__(self, name: str):
        return getattr(self._dist, name)

    def _everyone(self, ok: bool, group, device: torch.device) -> bool:
        """Whether ``ok`` holds on every rank of ``group`` (a minimum over NCCL, outside any capture)."""
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    @torch.compiler.disable
    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        dist = self._dist
        target = self._one_shot_view(tensor, op, group, async_op)
        if target is None:
            return dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group, async_op=async_op)
        shared, group_name = target
        # Two kernels, not the fused copy-in variant (``one_shot_all_reduce_copy_out``): that kernel signals the
        # peers without a block-wide barrier after its copy, so a peer could read an element another warp of the
        # block has not stored yet. Here the copy finishes before the all-reduce kernel, whose opening barrier
        # the peers pass only after theirs.
        shared.copy_(tensor)
        _one_shot(shared, group_name, tensor)
        self.captured += torch.cuda.is_current_stream_capturing()
        return None

    def _one_shot_view(self, tensor, op, group, async_op) -> tuple[torch.Tensor, str] | None:
        dist = self._dist
        if self._buffers.unavailable is not None or async_op or (op is not None and op != dist.ReduceOp.SUM):
            return None
        if not (tensor.is_cuda and tensor.is_contiguous() and tensor.dtype in (torch.bfloat16, torch.float32)):
            return None
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes % 16 or nbytes > _LARGEST or tensor.data_ptr() % 16:  # the kernel's 16-byte vectors
            return None
        group = group if group is not None else dist.group.WORLD
        if dist.get_world_size(group) not in _WORLD_SIZES:
            return None
        group_name = group.group_name
        shared = self._buffers.view(group_name, tensor, lambda ok: self._everyone(ok, group, tensor.device))
        return None if shared is None else (shared, group_name)


def _one_shot(shared: torch.Tensor, group_name: str, out: torch.Tensor) -> None:
    """The sum over the group of every rank's ``shared`` buffer, into ``out`` (PyTorch's one-shot kernel)."""
    torch.ops.symm_mem.one_shot_all_reduce_out(shared, "sum", group_name, out)


@torch.compiler.disable
def summed_product(input: torch.Tensor, weight: torch.Tensor, launch: list[int] | None, group) -> torch.Tensor:
    """``F.linear(input, weight)`` summed over ``group``, as Transformers' row-parallel layer sums it: through its
    module's ``dist``, our one-shot stand-in while a step is captured. Where the one-shot applies, the product is
    written straight into the shared buffer (by our kernel where ``launch`` applies), one copy kernel fewer."""
    from transformers.distributed import tensor_parallel

    from ._narrow_products import _built, _ours, narrow_linear, product

    dist = tensor_parallel.dist
    if isinstance(dist, _DistWithOneShot):
        out = input.new_empty(*input.shape[:-1], weight.shape[0])
        position = dist.position  # None outside a step's warm-up or capture (`step_begins`): never pushed there
        if position is not None:
            dist.position += 1
        target = dist._one_shot_view(out, None, group, False)  # (also the pushed sums' conditions)
        if target is not None and position and _pushed(dist, input, weight, launch, group, out):
            return out  # (a step's first sum stays one-shot: see `_pushed_sums`)
        if target is not None:
            shared, group_name = target
            kernel = _ours(input, weight, launch)
            if not kernel or _built(narrow_linear, input, weight, None, launch, out=shared) is None:
                shared.copy_(product(input, weight, None, None))
            _one_shot(shared, group_name, out)
            dist.captured += torch.cuda.is_current_stream_capturing()
            return out
    out = product(input, weight, None, launch)
    dist.all_reduce(out, group=group)
    return out


def _pushed(dist: _DistWithOneShot, input, weight, launch, group, out: torch.Tensor) -> bool:
    """Whether the sum went as a pushed sum (`_pushed_sums`) into ``out``: our product kernel pushing its part to
    the other GPU, then summing where the other's landed. A sum the one-shot takes (the caller checked), on two
    GPUs, inputs our kernel takes, a landing buffer."""
    from . import _pushed_sums
    from ._narrow_products import _built, _ours, narrow_linear

    if not _ours(input, weight, launch):
        return False
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) != 2:
        return False
    if dist.landings is None:
        dist.landings = _pushed_sums.Landings()
    regions = dist.landings.regions(group.group_name, out, lambda ok: dist._everyone(ok, group, out.device))
    if regions is None:
        return False
    theirs, mine = regions
    if _built(narrow_linear, input, weight, None, launch, out=out, peer=theirs) is None:
        # Our kernel cannot be built here (now): the other rank may have pushed already, so push all the same,
        # the product by F.linear and its zeros as +0.0, as the kernel stores them.
        out.copy_(torch.nn.functional.linear(input, weight)).masked_fill_(out == 0, 0.0)
        theirs.copy_(out.view(theirs.dtype))
    _pushed_sums.landed_sum(out, mine)
    dist.captured += torch.cuda.is_current_stream_capturing()
    dist.pushed += torch.cuda.is_current_stream_capturing()
    return True


def step_begins() -> None:
    """A decode step's warm-up or capture begins: its sums are counted from the first again (`summed_product`)."""
    for proxy in _PROXIES:
        proxy.position = 0
        if proxy.landings is not None:
            proxy.landings.step_begins()


def _steps_end(failed: bool) -> None:
    """The captured steps' block ends: no sum is pushed outside it. After a failure, parts pushed into a landing
    region whose sum never ran may still be there, where a later sum would take them for the other's: the landing
    buffers are not used again (every later sum goes one-shot)."""
    for proxy in _PROXIES:
        proxy.position = None
        if failed and proxy.landings is not None:
            proxy.landings.unavailable = "a decode step failed while its sums were pushed"


def captured_pushed_sums() -> int:
    """How many pushed sums (`_pushed_sums`) this process has recorded into CUDA graphs."""
    return sum(proxy.pushed for proxy in _PROXIES)


@functools.cache
def _dist_with_one_shot(dist) -> _DistWithOneShot:
    """One stand-in per process: compiled layers guard on the module global they read, so every capture must see
    the same object (a new one each time would recompile them)."""
    proxy = _DistWithOneShot(dist, _Buffers())
    _PROXIES.append(proxy)
    return proxy


def shared_buffers() -> int:
    """How many symmetric-memory buffers this process has made (0: every all-reduce went to NCCL)."""
    return sum(len(proxy._buffers._held) for proxy in _PROXIES)


def captured_one_shots() -> int:
    """How many one-shot all-reduces this process has recorded into CUDA graphs (the tests' evidence that a
    captured step sums over symmetric memory, not NCCL)."""
    return sum(proxy.captured for proxy in _PROXIES)


_PROXIES: list[_DistWithOneShot] = []
_NCCL_ONLY = False  # set by `nccl_only`


@contextlib.contextmanager
def nccl_only():
    """Inside the block, captured steps keep NCCL's all-reduce (a baseline for the benchmarks)."""
    global _NCCL_ONLY
    held, _NCCL_ONLY = _NCCL_ONLY, True
    try:
        yield
    finally:
        _NCCL_ONLY = held


@contextlib.contextmanager
def one_shot_all_reduces():
    """Inside the block, Transformers' tensor-parallel layers all-reduce one-shot over symmetric memory (a no-op
    outside a distributed run, or where Transformers has no tensor-parallel module)."""
    if _NCCL_ONLY or not (
        torch.distributed.is_available() and torch.distributed.is_initialized() and torch.cuda.is_available()
    ):
        yield
        return
    try:
        from transformers.distributed import tensor_parallel
    except ImportError:  # another Transformers layout: its all-reduces stay NCCL's
        yield
        return
    held = tensor_parallel.dist
    if isinstance(held, _DistWithOneShot):  # nested: already in place
        yield
        return
    tensor_parallel.dist = _dist_with_one_shot(held)
    failed = True
    try:
        yield
        failed = False
    finally:
        _steps_end(failed)
        tensor_parallel.dist = held
