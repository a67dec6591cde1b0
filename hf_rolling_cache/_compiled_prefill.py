"""What the compiled prefill (`use_cuda_graphs(compile_prefill=True)`) changes beyond compiling the layers: while
its forward runs (`prefill_kernel`), prefill attention may go to the faster kernels that need a warm-up of their own
(cuDNN's fused attention, `_cudnn`, where NVIDIA's cudnn-frontend is installed; else FlexAttention, `_flex`), and
dynamic sizes get a symbol each (`distinct_sizes`). Everywhere else prefill stays with xFormers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float16)  # float32 prefill stays with xFormers: the exactness tests' kernels

_depth = [0]  # nesting depth of `prefill_kernel`


@contextlib.contextmanager
def prefill_kernel() -> Iterator[None]:
    """Prefill attention by the compiled prefill's kernels inside the block."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def active() -> bool:
    """Whether a `prefill_kernel` block is running."""
    return _depth[0] > 0


def inside(query: torch.Tensor, softcap: float | None, sinks: torch.Tensor | None) -> bool:
    """Whether ``query``'s prefill may leave xFormers: inside `prefill_kernel`, on CUDA, in bf16 or fp16, for
    inference (the kernels get detached tensors), without a score cap or sinks (which neither kernel takes)."""
    return (
        active() and query.is_cuda and query.dtype in DTYPES and not query.requires_grad
        and softcap is None and sinks is None
    )


class KernelSwitch:
    """One of the compiled prefill's kernels: on, unless switched off (`exact_kernels`) or refused for some inputs
    (it failed on them here: warned once, and the next kernel runs them from then on)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = True
        self.refused: set[tuple] = set()  # `inputs` the kernel failed on

    def takes(self, query: torch.Tensor) -> bool:
        return self.enabled and inputs(query) not in self.refused

    def run(self, query: torch.Tensor, attend: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``attend()``, or None where it fails on these inputs (refused from now on, with a warning). Running out
        of memory is no refusal of the inputs: it is raised, the caller's to handle as with any kernel."""
        try:
            return attend()
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure to build or run: the next kernel for such inputs
            self.refused.add(inputs(query))
            logger.warning("%s cannot run the prefill here for %s queries of head size %d (%s: %s); using the next "
                           "kernel for them.", self.name, query.dtype, query.shape[-1], type(error).__name__, error)
            return None


def inputs(query: torch.Tensor) -> tuple:
    """What a refusal is for: the query's dtype, head size and device."""
    return query.dtype, query.shape[-1], query.device


def distinct_sizes():
    """Compile with a symbol of its own for every dynamic size. By default sizes that are equal at the first call
    share one (a first chunk has as many keys as queries; 4096 tokens, as many as a 7B model's hidden size), and
    the first call where they differ compiles again."""
    import torch.fx.experimental._config as shapes

    return shapes.patch(use_duck_shape=False)
