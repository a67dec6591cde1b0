"""A tensor-parallel decode step's sums of row-parallel products in one trip over NVLink: each GPU's product kernel
pushes its partial product into the other GPU's landing buffer, and a small kernel sums it where it lands.

PyTorch's one-shot all-reduce (`_all_reduce`) crosses NVLink three times for each sum: a barrier before (each GPU
tells the other its part is ready), the reads of the other's part, and a barrier after (each tells the other it has
read). At a decode step's few kilobytes those crossings are the whole cost, about 10 us on two H100s, and a 7B
step sums 64 times. Here the product kernel stores its result into the other GPU's landing buffer as well as into
its own output (`_narrow_products.narrow_linear`, ``peer=``), and `_landed_sum` on each GPU waits for the other's
part to land, adds it to its own (the same float32 add on both GPUs, so both get the same bits), and clears the
region again. A landing buffer holds negative zeros where nothing has landed: the product kernel stores every
zero as +0.0, so no landed value is -0.0, and an element is there once it is not -0.0 (each element is stored and
read whole, so no flag or fence is needed). This is the "Lamport" one-shot all-reduce of TensorRT-LLM's custom
all-reduce, written for our product kernel.

When a region can be used again. Each position in a step (its first sum, its second, ...) has its own region. A
GPU stores into the other's region of position ``p`` only after its sum ``p - 1`` has completed, and that needed
the other's product ``p - 1``, which the other ran after its own sum ``p - 2``: so the other may still be reading
region ``p - 1``, never ``p``. The first sum of every step goes through PyTorch's one-shot kernel instead, whose
barriers line both GPUs up: nothing of the next step lands before both have finished every sum of this one.
Two GPUs only (a group of 4 or 8 keeps the one-shot kernel), inputs our product kernel takes, and a step's parts
within the buffer (`_LANDING_BYTES`); the choice depends on shapes only, so every rank makes the same one.

Failures. Both kernels are checked to build before the ranks agree to push; if the product kernel cannot be built
later, the part is computed by ``F.linear`` and pushed all the same. A step that raises may leave parts whose sums
never ran in a landing buffer: the buffers are then not used again (`_all_reduce._steps_end`). A rank that stops
in the middle of a step (killed, or an error on that rank only) leaves the other waiting in `_landed_sum` with no
time limit, where NCCL's all-reduce would wait for its watchdog.
"""

from __future__ import annotations

import torch

from ._ring_decode import _dependent_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # (then our product kernel never applies, and every sum stays one-shot)
    triton = tl = None

_LANDING_BYTES = 32 << 20  # a landing buffer: a whole 7B step's parts at 16 rows in float32 (64 x 256 KiB)
_ALIGN = 16  # bytes: each region starts at a multiple (the kernels' vector width)
_BLOCK = 1024  # elements a program of `_landed_sum` sums


if tl is not None:

    @triton.jit
    def _landed_sum(MINE, LANDING, n, NEGATIVE_ZERO: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # MINE: this GPU's part (float), the sum written over it. LANDING: the other's part as integers of the same
        # width, NEGATIVE_ZERO's bits where it has not landed yet; put back once read.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        if PDL:  # launched before the product that writes MINE finished: wait for it
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bits = tl.load(LANDING + offs, mask=inside, other=0, volatile=True)
        while tl.max((bits == NEGATIVE_ZERO).to(tl.int32), axis=0) > 0:
            bits = tl.load(LANDING + offs, mask=inside, other=0, volatile=True)
        theirs = bits.to(MINE.dtype.element_ty, bitcast=True).to(tl.float32)
        mine = tl.load(MINE + offs, mask=inside).to(tl.float32)
        tl.store(MINE + offs, (mine + theirs).to(MINE.dtype.element_ty), mask=inside)
        tl.store(LANDING + offs, tl.full([BLOCK], NEGATIVE_ZERO, LANDING.dtype.element_ty), mask=inside)


def bits_of(dtype: torch.dtype) -> torch.dtype:
    """The integer type a landing buffer of ``dtype`` values is read as."""
    return {2: torch.int16, 4: torch.int32}[dtype.itemsize]


def negative_zero(dtype: torch.dtype) -> int:
    """-0.0's bits in ``dtype``, as a signed integer of its width."""
    return -(1 << (8 * dtype.itemsize - 1))


def landed_sum(mine: torch.Tensor, landing: torch.Tensor) -> None:
    """``mine += theirs`` once all of ``landing`` (``theirs``' bits, `bits_of` ``mine``'s dtype) has landed; the
    landing region is cleared again."""
    n = mine.numel()
    _landed_sum[(triton.cdiv(n, _BLOCK),)](
        mine, landing, n, NEGATIVE_ZERO=negative_zero(mine.dtype), BLOCK=_BLOCK, **_dependent_launch(mine)
    )


def _sum_builds(like: torch.Tensor) -> bool:
    """Whether `_landed_sum` builds (and runs) for ``like``'s dtype and device: checked on a region of this GPU that
    has landed, before every rank agrees to push (a rank that could not sum would leave the other waiting)."""
    from ._ring_decode import compile_errors

    try:
        landed = torch.zeros(8, dtype=bits_of(like.dtype), device=like.device)
        landed_sum(torch.zeros(8, dtype=like.dtype, device=like.device), landed)
        return True
    except compile_errors():
        return False


class Landings:
    """This GPU's landing buffer and the other GPU's, per (group, device, dtype), and where this step's next
    region starts in them."""

    def __init__(self) -> None:
        self._held: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (mine, theirs), as integers
        self._next: dict[tuple, int] = {}
        self.unavailable: str | None = None

    def step_begins(self) -> None:
        self._next.clear()

    def regions(self, group_name: str, like: torch.Tensor, agree) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the other GPU's region, this GPU's region) for this step's next sum shaped like ``like``, as integers
        of its width; None where the step's parts no longer fit, or no buffer can be made (inside a capture, or
        on some rank: ``agree(ok)`` tells every rank whether all are ok)."""
        key = (group_name, like.device, like.dtype)
        held = self._held.get(key)
        if held is None:
            if self.unavailable is not None or torch.cuda.is_current_stream_capturing():
                return None
            held = self._allocate(group_name, like, agree)
            if held is None:
                return None
            self._held[key] = held
        start = self._next.get(key, 0)
        stop = start + like.numel()
        if stop > held[0].numel():
            return None
        self._next[key] = -(-stop * like.element_size() // _ALIGN) * _ALIGN // like.element_size()
        return held[1][start:stop].view(like.shape), held[0][start:stop].view(like.shape)

    def _allocate(self, group_name: str, like: torch.Tensor, agree) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both landing buffers, filled with -0.0 on every rank before any rank may store into another's (the
        agreement is an all-reduce after the fill, on the same stream)."""
        from torch.distributed import _symmetric_memory as symm_mem

        bits = bits_of(like.dtype)
        mine, reason = None, "another rank of the group could not allocate a landing buffer"
        try:
            mine = symm_mem.empty(_LANDING_BYTES // like.element_size(), dtype=bits, device=like.device)
            mine.fill_(negative_zero(like.dtype))
        except Exception as error:  # no peer access, a PyTorch without symmetric memory: one-shot sums as before
            reason = f"{type(error).__name__}: {error}"
        if mine is not None and not _sum_builds(like):
            mine, reason = None, "the landed-sum kernel cannot be built here"
        if agree(mine is not None):
            try:
                handle = symm_mem.rendezvous(mine, group_name)
                if handle.world_size == 2:
                    theirs = handle.get_buffer(1 - handle.rank, tuple(mine.shape), bits)
                    if agree(True):  # every rank filled and mapped its buffer before any stores into another's
                        return mine, theirs
                    reason = "another rank of the group could not map its landing buffer"
                else:
                    reason = f"a group of {handle.world_size} GPUs (pushed sums are for 2)"
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                agree(False)
        self.unavailable = reason
        return None
