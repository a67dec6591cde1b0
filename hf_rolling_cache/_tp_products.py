"""Tensor-parallel shards in the compiled decode step's products (Transformers' ``tp_plan``).

Under Transformers' tensor parallelism each process holds a shard of every projection: a column-parallel one (q/k/v,
gate/up) a slice of the output rows, a row-parallel one (o, down) a slice of the input columns, whose partial
products the processes then sum (an all-reduce). Transformers installs a forward of its own on each such
``nn.Linear`` (``tp_forward``). With no gradient and a plain input, it multiplies the local shards (``F.linear``),
and a row-parallel one then all-reduces the product and adds the bias. `shard_of` recognizes exactly those
forwards, with Transformers' default layouts, so that the compiled step can multiply the same shards by our kernel
and fuse a layer's column-parallel shards (`_fused`), as on one GPU. Anything else keeps Transformers' forward:
another style or layout, a quantized or hooked module, a forward replaced since.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_WEIGHT, _BIAS = "_hf_rolling_cache_shard_weight", "_hf_rolling_cache_shard_bias"
_LINEAR_FORWARD = torch.nn.Linear.forward  # as imported: a class-wide patch since is not the plain product


@dataclass(frozen=True)
class Sharded:
    """How Transformers shards one ``nn.Linear``: ``rowwise`` (partial products summed over ``group``) or not (a
    slice of the output rows), and the forward it installed (put back after a step)."""

    rowwise: bool
    group: object  # the mesh's process group
    forward: types.FunctionType


def shard_of(module: torch.nn.Module) -> Sharded | None:
    """Transformers' tensor-parallel sharding of ``module``, if it is a plain ``nn.Linear`` whose forward is still
    the one Transformers installed around ``nn.Linear.forward``, column-parallel with a replicated input and a
    sharded output or row-parallel with a sharded input and a replicated (all-reduced) output, with no hooks of
    its own and weights as Transformers shards them for those styles. None for anything else."""
    reference = _installed_forward_code()
    forward = vars(module).get("forward")
    if reference is None or type(module) is not torch.nn.Linear or getattr(forward, "__code__", None) is not reference:
        return None
    cells = dict(zip(reference.co_freevars, (cell.cell_contents for cell in forward.__closure__)))
    original = cells.get("original_forward")
    if cells.get("module") is not module or getattr(original, "__func__", None) is not _LINEAR_FORWARD:
        return None
    if getattr(original, "__self__", None) is not module or getattr(module, "_hf_quantized_needs_local_tp", False):
        return None
    from ._fused import _hooked  # (imported already: `_fused` imports this module)

    if _hooked(module):
        return None
    style, mesh = cells.get("self"), cells.get("mesh")
    rowwise = _style(style)
    if rowwise is None or getattr(mesh, "ndim", None) != 1:
        return None
    from torch.distributed.tensor import DTensor, Replicate

    weight_dim = 1 if rowwise else 0
    if not isinstance(module.weight, DTensor) or not _sharded_on(module.weight, weight_dim):
        return None
    bias = module.bias
    if bias is not None and not (
        isinstance(bias, DTensor) and (bias.placements == (Replicate(),) if rowwise else _sharded_on(bias, 0))
    ):
        return None
    return Sharded(rowwise=rowwise, group=mesh.get_group(), forward=forward)


def local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The values this process holds of a parameter: a DTensor's local tensor (the one object it keeps, so that
    re-pointing its ``data`` re-points the DTensor), a plain tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


@contextlib.contextmanager
def swapped_in(shards: list[tuple[torch.nn.Linear, Sharded, list[int]]]) -> Iterator[None]:
    """Inside the block, each sharded ``(linear, sharding, launch)`` multiplies by our kernel (`sharded_forward`),
    its local tensors registered as buffers (graph inputs: one compiled code serves every layer). Transformers'
    forward is put back after, also after a failure half way."""
    done = []
    try:
        for linear, sharded, launch in shards:
            done.append((linear, sharded))
            linear.register_buffer(_WEIGHT, local(linear.weight), persistent=False)
            linear.register_buffer(_BIAS, local(linear.bias), persistent=False)
            linear.tp_rowwise, linear.tp_group, linear.narrow_launch = sharded.rowwise, sharded.group, launch
            linear.tp_forward = sharded.forward
            linear.forward = types.MethodType(sharded_forward, linear)
        yield
    finally:
        for linear, sharded in done:
            for name in (_WEIGHT, _BIAS):
                linear._buffers.pop(name, None)
                linear._non_persistent_buffers_set.discard(name)
            for name in ("tp_rowwise", "tp_group", "narrow_launch", "tp_forward"):
                vars(linear).pop(name, None)
            linear.forward = sharded.forward


def sharded_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """What Transformers' forward computes for a plain input without gradient, the shard's product by our kernel:
    column-parallel, the local rows (and bias); row-parallel, the partial product summed over the group
    (`_all_reduce.summed_product`), then the bias. Anything else goes to Transformers' forward."""
    if not inference_input(input):
        return self.tp_forward(input)
    from ._all_reduce import _DistWithOneShot, summed_product
    from ._narrow_products import product  # imported already: the launch came from it

    from transformers.distributed import tensor_parallel

    weight, bias = getattr(self, _WEIGHT), getattr(self, _BIAS)
    if not self.tp_rowwise:
        return product(input, weight, bias, self.narrow_launch)
    if isinstance(tensor_parallel.dist, _DistWithOneShot):  # a captured step's sums (eager: one graph break)
        out = summed_product(input, weight, self.narrow_launch, self.tp_group)
    else:  # torch.distributed's all-reduce, which the compiler traces, as in Transformers' forward
        out = product(input, weight, None, self.narrow_launch)
        tensor_parallel.dist.all_reduce(out, group=self.tp_group)
    return out if bias is None else out + bias


def inference_input(input) -> bool:
    """A plain tensor without gradient: where Transformers' forward multiplies the local shards as they are (a
    DTensor input, or a gradient to keep, goes to that forward)."""
    return type(input) is torch.Tensor and not torch.is_grad_enabled()


def agreed(shards: list[tuple[torch.nn.Linear, Sharded, list[int] | None]]) -> list[tuple]:
    """The ``(linear, sharding, launch)`` of ``shards`` to swap in: the column-parallel ones with a launch, and the
    row-parallel ones with a launch on every rank of their group. A row-parallel shard's sum is a collective
    (`_all_reduce.summed_product`), whose kind every rank must choose alike; with uneven shards (a width the
    ranks do not divide alike) our kernel may take one rank's shard and not another's. One all-reduce (the
    minimum) per group, outside any capture: every rank lists the same modules in the same order."""
    import torch.distributed as dist

    chosen = [(linear, sharded, launch) for linear, sharded, launch in shards if not sharded.rowwise and launch]
    rowwise = [entry for entry in shards if entry[1].rowwise]
    for group in {id(entry[1].group): entry[1].group for entry in rowwise}.values():
        members = [entry for entry in rowwise if entry[1].group is group]
        ours = torch.tensor([entry[2] is not None for entry in members], dtype=torch.int32,
                            device=local(members[0][0].weight).device)
        dist.all_reduce(ours, op=dist.ReduceOp.MIN, group=group)
        chosen += [entry for entry, everywhere in zip(members, ours.tolist()) if everywhere]
    return chosen


def _style(style) -> bool | None:
    """True for Transformers' row-parallel style with its default layouts, False for its column-parallel one,
    None for any other."""
    try:
        from torch.distributed.tensor import Replicate, Shard
        from transformers.distributed.tensor_parallel import ColwiseParallel, RowwiseParallel
    except ImportError:
        return None
    if not getattr(style, "use_local_output", False):
        return None
    if type(style) is ColwiseParallel and style.input_layouts == Replicate() and style.output_layouts == Shard(-1):
        return False
    if type(style) is RowwiseParallel and style.input_layouts == Shard(-1) and style.output_layouts == Replicate():
        return True
    return None


def _sharded_on(tensor, dim: int) -> bool:
    from torch.distributed.tensor import Shard

    placements = tensor.placements
    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim % tensor.dim() == dim


def _installed_forward_code() -> types.CodeType | None:
    """The code of the forward Transformers' ``TensorParallelLayer.install_forward`` puts on a module."""
    try:
        from transformers.distributed.tensor_parallel import TensorParallelLayer
    except ImportError:
        return None
    nested = [c for c in TensorParallelLayer.install_forward.__code__.co_consts if isinstance(c, types.CodeType)]
    return nested[0] if len(nested) == 1 and nested[0].co_name == "tp_forward" else None
