"""Fused weight products for the compiled decode step: a layer's q/k/v projections as one product, and gate/up.

A decode step reads every weight once, and a narrow product pays a launch, a tail and often a split-K reduce of its
own: on an H100, Mistral-7B's seven products a layer reach 81% of the copy bandwidth at batch 1, the four fused ones
88% (`benchmarks/fused_products.py`). So `use_cuda_graphs(compile=True)` lays each group's weights out as rows of one
buffer, the modules' own parameters becoming views of their rows (no second copy of the weights; eager calls, such
as prefill, multiply the same values with the same strides). Inside the compiled step each module of a group computes the product of its
group's whole buffer and takes its rows; the compiler sees the same product of the same input two or three times and
keeps one (`SameProducts`). `release_cuda_graphs` gives each parameter its own storage again.
"""

from __future__ import annotations

import contextlib
import types
from collections import Counter
from collections.abc import Iterator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

# Sibling projections that read the same input, in the order a decoder layer calls them.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_WEIGHT, _BIAS = "_hf_rolling_cache_fused_weight", "_hf_rolling_cache_fused_bias"


class FusedGroup:
    """Sibling ``nn.Linear`` modules whose weights (and biases) are rows of one buffer."""

    def __init__(self, parts: list[torch.nn.Linear]) -> None:
        self.parts = parts
        first = parts[0]
        rows = [part.out_features for part in parts]
        self.weight = torch.empty(sum(rows), first.in_features, dtype=first.weight.dtype, device=first.weight.device)
        self.bias = None if first.bias is None else self.weight.new_empty(sum(rows), dtype=first.bias.dtype)
        self.rows: list[tuple[int, int]] = []
        start = 0
        with torch.no_grad():
            for part, count in zip(parts, rows):
                stop = start + count
                self.weight[start:stop].copy_(part.weight)
                part.weight.data = self.weight[start:stop]  # the same Parameter, now a view: nothing held twice
                if self.bias is not None:
                    self.bias[start:stop].copy_(part.bias)
                    part.bias.data = self.bias[start:stop]
                self.rows.append((start, stop))
                start = stop

    def intact(self) -> bool:
        """Every part still reads exactly its rows of the buffer (weight and bias, or no bias as when fused), with
        no forward of its own: nothing replaced or added a parameter since (``model.to``, a new Parameter). If
        something did, the buffer is stale and must not be used."""
        if self.weight is None:
            return False
        for part, (start, stop) in zip(self.parts, self.rows):
            if "forward" in vars(part):
                return False
            if not _view_of(part.weight, self.weight[start:stop]):
                return False
            if (part.bias is None) != (self.bias is None):
                return False  # a bias added (or removed) since: the buffer has no (or another) bias
            if self.bias is not None and not _view_of(part.bias, self.bias[start:stop]):
                return False
        return True

    def separate(self) -> None:
        """Give each parameter still viewing the buffer its own storage again, and drop the buffer (a part whose
        parameter was replaced since keeps the new one)."""
        if self.weight is None:
            return
        with torch.no_grad():
            for part, (start, stop) in zip(self.parts, self.rows):
                if _view_of(part.weight, self.weight[start:stop]):
                    part.weight.data = part.weight.data.clone()
                if self.bias is not None and _view_of(part.bias, self.bias[start:stop]):
                    part.bias.data = part.bias.data.clone()
        self.weight = self.bias = None

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Each part computes the whole group's product and takes its rows (a graph input, registered as a buffer
        on each part, so that one compiled code serves every layer). Undone part by part, also after a failure
        half way."""
        swapped = []
        launch = narrow_launch(self.weight, self.bias)
        try:
            for part, rows in zip(self.parts, self.rows):
                swapped.append(part)
                part.register_buffer(_WEIGHT, self.weight, persistent=False)
                part.register_buffer(_BIAS, self.bias, persistent=False)
                part.fused_rows = rows
                part.fused_launch = launch
                part.forward = types.MethodType(_rows_of_fused_product, part)
            yield
        finally:
            for part in swapped:
                for name in (_WEIGHT, _BIAS):
                    part._buffers.pop(name, None)
                    part._non_persistent_buffers_set.discard(name)
                for name in ("fused_rows", "fused_launch", "forward"):
                    vars(part).pop(name, None)


def _view_of(param: torch.Tensor | None, rows: torch.Tensor) -> bool:
    """``param`` is the view ``rows`` of the buffer: same place, shape, strides and dtype."""
    return (
        param is not None and _plain(param) and param.data_ptr() == rows.data_ptr() and param.shape == rows.shape
        and param.stride() == rows.stride() and param.dtype == rows.dtype
    )


def _rows_of_fused_product(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    start, stop = self.fused_rows
    return _product(input, getattr(self, _WEIGHT), getattr(self, _BIAS), self.fused_launch)[..., start:stop]


def narrow_launch(weight: torch.Tensor, bias: torch.Tensor | None) -> list[int] | None:
    """`_narrow_products.launch_for`, imported (with Triton, where installed) on first use."""
    from ._narrow_products import launch_for

    return launch_for(weight, bias)


def _product(input, weight, bias, launch):
    from ._narrow_products import product  # imported already: the launch came from it

    return product(input, weight, bias, launch)


def narrow_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """A plain ``nn.Linear``'s forward in the compiled decode step: its product by our kernel where it applies."""
    return _product(input, self.weight, self.bias, self.narrow_launch)


def fuse_groups(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[FusedGroup]:
    """Fuse every group of plain sibling projections in ``layers`` whose parameters own their storage alone."""
    storages = Counter(
        t.untyped_storage().data_ptr()
        for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        if _plain(t)
    )
    groups = []
    for layer in layers:
        for module in layer.modules():
            for names in GROUPS:
                parts = [module._modules.get(name) for name in names]
                if _fusable(parts, storages):
                    groups.append(FusedGroup(parts))
    return groups


def _fusable(parts, storages: Counter) -> bool:
    if not all(type(part) is torch.nn.Linear for part in parts):
        return False  # absent, or a subclass (quantized, LoRA) whose forward is not a plain product
    first = parts[0]
    for part in parts:
        if wrapped(part):
            return False
        for param in (part.weight, part.bias):
            if param is None:
                continue
            if not _plain(param) or not param.is_contiguous():
                return False  # a distributed (tensor parallel) or offloaded weight, or a view already
            owns = param.untyped_storage().nbytes() == param.numel() * param.element_size()
            if not owns or storages[param.untyped_storage().data_ptr()] != 1:
                return False  # shared with another parameter (tied), or part of a larger buffer
        if (part.in_features, part.weight.dtype, part.weight.device, part.bias is None) != (
            first.in_features, first.weight.dtype, first.weight.device, first.bias is None
        ) or (part.bias is not None and part.bias.dtype != first.bias.dtype):
            return False
    return True


def wrapped(module: torch.nn.Module) -> bool:
    """Someone else's code runs around ``module``'s forward: a hook, Accelerate's, or a forward of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook")
                or "forward" in vars(module))


def _plain(tensor: torch.Tensor) -> bool:
    """A tensor with storage of its own kind: not a subclass (a tensor-parallel DTensor has none), not on "meta"."""
    return type(tensor.data) is torch.Tensor and tensor.device.type != "meta"


class SameProducts(CustomGraphPass):
    """Inductor's post-grad pass that keeps one of identical products (and of the identical views that feed them):
    a fused group's parts each ask for the same product of the same input. CSE of pure, deterministic ops only, on
    the functional graph (inductor runs it before re-inplacing), and never of a tensor the graph returns."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        pure = {aten.mm.default, aten.addmm.default, aten.view.default, aten._unsafe_view.default,
                aten.reshape.default, aten.permute.default, aten.t.default, aten.expand.default}
        if hasattr(torch.ops.hf_rolling_cache, "narrow_linear"):  # registered once `_narrow_products` is imported
            pure.add(torch.ops.hf_rolling_cache.narrow_linear.default)
        first: dict[tuple, torch.fx.Node] = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in pure or _returned(node):
                continue  # a returned tensor stays its own (merged, two outputs would alias each other)
            key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
            if key in first:
                node.replace_all_uses_with(first[key])
                graph.erase_node(node)
            else:
                first[key] = node

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _returned(node: torch.fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)
