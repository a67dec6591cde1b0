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
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ._tp_products import Sharded, inference_input, local, shard_of

# Sibling projections that read the same input, in the order a decoder layer calls them.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_WEIGHT, _BIAS = "_hf_rolling_cache_fused_weight", "_hf_rolling_cache_fused_bias"


class FusedGroup:
    """Sibling ``nn.Linear`` modules whose weights (and biases) are rows of one buffer. Under tensor parallelism
    (``sharded``: Transformers' column-parallel forwards, `_tp_products.shard_of`), the rows of this process's
    shards."""

    def __init__(
        self, parts: list[torch.nn.Linear], owner: torch.nn.Module | None = None, sharded: list[Sharded] | None = None
    ) -> None:
        self.parts = parts
        self.owner = owner  # the module that calls them (the attention, the MLP)
        self.sharded = sharded
        first = local(parts[0].weight)
        rows = [local(part.weight).shape[0] for part in parts]
        self.weight = torch.empty(sum(rows), first.shape[1], dtype=first.dtype, device=first.device)
        self.bias = None if parts[0].bias is None else self.weight.new_empty(sum(rows), dtype=parts[0].bias.dtype)
        self.rows: list[tuple[int, int]] = []
        start = 0
        with torch.no_grad():
            for part, count in zip(parts, rows):
                stop = start + count
                self.weight[start:stop].copy_(local(part.weight))
                # The same Parameter (or DTensor), its values now a view: nothing held twice.
                local(part.weight).data = self.weight[start:stop]
                if self.bias is not None:
                    self.bias[start:stop].copy_(local(part.bias))
                    local(part.bias).data = self.bias[start:stop]
                self.rows.append((start, stop))
                start = stop

    def intact(self) -> bool:
        """Every part still reads exactly its rows of the buffer (weight and bias, or no bias as when fused), with
        no forward of its own: nothing replaced or added a parameter since (``model.to``, a new Parameter). If
        something did, the buffer is stale and must not be used."""
        if self.weight is None:
            return False
        for index, (part, (start, stop)) in enumerate(zip(self.parts, self.rows)):
            if vars(part).get("forward") is not (self.sharded[index].forward if self.sharded else None):
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
                    local(part.weight).data = local(part.weight).data.clone()
                if self.bias is not None and _view_of(part.bias, self.bias[start:stop]):
                    local(part.bias).data = local(part.bias).data.clone()
        self.weight = self.bias = None

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Each part computes the whole group's product and takes its rows (a graph input, registered as a buffer
        on each part, so that one compiled code serves every layer). Undone part by part, also after a failure
        half way."""
        swapped = []
        launch = narrow_launch(self.weight, self.bias)
        forward = _rows_of_fused_shards if self.sharded else _rows_of_fused_product
        try:
            for index, (part, rows) in enumerate(zip(self.parts, self.rows)):
                swapped.append(index)
                part.register_buffer(_WEIGHT, self.weight, persistent=False)
                part.register_buffer(_BIAS, self.bias, persistent=False)
                part.fused_rows = rows
                part.fused_launch = launch
                if self.sharded:
                    part.tp_forward = self.sharded[index].forward
                part.forward = types.MethodType(forward, part)
            yield
        finally:
            for index in swapped:
                part = self.parts[index]
                for name in (_WEIGHT, _BIAS):
                    part._buffers.pop(name, None)
                    part._non_persistent_buffers_set.discard(name)
                for name in ("fused_rows", "fused_launch", "tp_forward", "forward"):
                    vars(part).pop(name, None)
                if self.sharded:
                    part.forward = self.sharded[index].forward  # Transformers' tensor-parallel forward, as it was


def gated_swap(group: FusedGroup) -> tuple[torch.nn.Module, str, types.MethodType] | None:
    """For a fused gate/up group, swapped in, whose MLP is the usual ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Llama's
    and its copies': Mistral, Qwen2, Qwen3, ...) and that nobody wraps: a forward of that MLP computing
    ``silu(gate) * up`` in the gate/up product's kernel (`_narrow_products.gated_product`), one kernel and one
    pass over the activations fewer a layer. None for any other group or MLP, and wherever a hook would run on the
    gate, up or activation modules (theirs or global ones), which that forward no longer calls."""
    mlp = group.owner
    if mlp is None or [mlp._modules.get(name) for name in GROUPS[1]] != group.parts:
        return None
    gate, up = group.parts
    if getattr(gate, "fused_launch", None) is None:
        return None  # the group's product is cuBLAS's here (`narrow_launch`): the MLP keeps its forward
    activation = mlp._modules.get("act_fn")
    if gate.out_features != up.out_features or _SILU.get(type(activation)) is not type(activation).forward:
        return None  # another activation, or SiLU's forward replaced (a kernel hub's, a patch)
    if wrapped(activation) or wrapped(mlp) or any(_hooked(part) for part in group.parts) or _global_hooks():
        return None
    if not isinstance(mlp._modules.get("down_proj"), torch.nn.Module):
        return None
    if not _same_code(getattr(type(mlp).forward, "__code__", None), _gated_mlp_reference.__code__):
        return None  # a forward of its own: it may not compute what the kernel does
    return mlp, "forward", types.MethodType(_gated_mlp_forward, mlp)


def _gated_mlp_reference(self, x):  # Transformers' LlamaMLP.forward, word for word: the form `gated_swap` takes
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from ._narrow_products import gated_product  # imported already: the group's launch came from it

    gate = self.gate_proj
    return self.down_proj(gated_product(x, getattr(gate, _WEIGHT), getattr(gate, _BIAS), gate.fused_launch))


def _same_code(code: types.CodeType | None, reference: types.CodeType) -> bool:
    """The same instructions on the same names and constants (line numbers and the file aside)."""
    return code is not None and all(
        getattr(code, field) == getattr(reference, field)
        for field in ("co_code", "co_names", "co_consts", "co_varnames", "co_argcount")
    )


def _silu_modules() -> dict[type, object]:
    """The SiLU modules `gated_swap` takes, each with its own forward (as imported)."""
    classes = [torch.nn.SiLU]
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        pass
    else:
        classes.append(SiLUActivation)
    return {cls: cls.forward for cls in classes}


_SILU = _silu_modules()


def _hooked(module: torch.nn.Module) -> bool:
    """Hooks of its own on ``module`` (its ``forward`` aside: a fused part's is ours while swapped in)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _global_hooks() -> bool:
    """Forward hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook``)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _view_of(param: torch.Tensor | None, rows: torch.Tensor) -> bool:
    """``param``'s values (a shard's, under tensor parallelism) are the view ``rows`` of the buffer: same place,
    shape, strides and dtype."""
    param = local(param)
    return (
        param is not None and _plain(param) and param.data_ptr() == rows.data_ptr() and param.shape == rows.shape
        and param.stride() == rows.stride() and param.dtype == rows.dtype
    )


def _rows_of_fused_product(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    start, stop = self.fused_rows
    return _product(input, getattr(self, _WEIGHT), getattr(self, _BIAS), self.fused_launch)[..., start:stop]


def _rows_of_fused_shards(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """A column-parallel part's rows: what Transformers' forward computes for a plain input without gradient (the
    local shard's product); anything else goes to that forward."""
    if not inference_input(input):
        return self.tp_forward(input)
    return _rows_of_fused_product(self, input)


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
    """Fuse every group of sibling projections in ``layers`` whose parameters own their storage alone: plain
    ones, or (tensor parallel) column-parallel shards of one process group."""
    storages = Counter(
        local(t).untyped_storage().data_ptr()
        for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        if _plain(local(t))
    )
    groups = []
    for layer in layers:
        for module in layer.modules():
            for names in GROUPS:
                parts = [module._modules.get(name) for name in names]
                if not all(type(part) is torch.nn.Linear for part in parts):
                    continue  # absent, or a subclass (quantized, LoRA) whose forward is not a plain product
                sharded = [shard_of(part) for part in parts]
                if all(sharded) and not any(s.rowwise or s.group is not sharded[0].group for s in sharded):
                    if _fusable(parts, storages, slices=True):
                        groups.append(FusedGroup(parts, module, sharded))
                elif not any(map(wrapped, parts)) and _all_plain(parts) and _fusable(parts, storages):
                    groups.append(FusedGroup(parts, module))
    return groups


def _all_plain(parts) -> bool:
    """Every parameter a plain tensor (a DTensor's values are fused only through its Transformers forward)."""
    return all(_plain(param) for part in parts for param in (part.weight, part.bias) if param is not None)


def _fusable(parts, storages: Counter, slices: bool = False) -> bool:
    """Parameters of one dtype, device and width, each alone in its storage, which it fills (``slices``: or of
    which it is a slice, as a tensor-parallel shard cut from the whole loaded tensor: once fused, that storage
    goes)."""
    first = local(parts[0].weight)
    for part in parts:
        for param in (local(part.weight), local(part.bias)):
            if param is None:
                continue
            if not _plain(param) or not param.is_contiguous():
                return False  # an offloaded weight, or a view already
            owns = param.untyped_storage().nbytes() == param.numel() * param.element_size()
            if not (owns or slices) or storages[param.untyped_storage().data_ptr()] != 1:
                return False  # shared with another parameter (tied), or part of a larger buffer
        weight = local(part.weight)
        if (weight.shape[1], weight.dtype, weight.device, part.bias is None) != (
            first.shape[1], first.dtype, first.device, parts[0].bias is None
        ) or (part.bias is not None and part.bias.dtype != parts[0].bias.dtype):
            return False
    return True


def wrapped(module: torch.nn.Module) -> bool:
    """Someone else's code runs around ``module``'s forward: a hook, Accelerate's, or a forward of its own."""
    return _hooked(module) or "forward" in vars(module)


def _plain(tensor: torch.Tensor) -> bool:
    """A tensor with storage of its own kind: not a subclass (a tensor-parallel DTensor has none), not on "meta"."""
    return type(tensor.data) is torch.Tensor and tensor.device.type != "meta"


class SameProducts(CustomGraphPass):
    """Inductor's post-grad pass over the compiled step's products. It keeps one of identical products (and of the
    identical views that feed them): a fused group's parts each ask for the same product of the same input. CSE of
    pure, deterministic ops only, on the functional graph (inductor runs it before re-inplacing), and never of a
    tensor the graph returns. Then it folds a residual add into our product before it (`_fold_residual_adds`)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._same_products(graph)
        _fold_residual_adds(graph)

    def _same_products(self, graph: torch.fx.Graph) -> None:
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

    def uuid(self) -> bytes:  # (this pass writes `_narrow_products`' operators: its code is part of the key)
        return get_hash_for_files((__file__, str(Path(__file__).with_name("_narrow_products.py"))))

    # torch.compile reuses code compiled for another module only under an equal backend, and inductor's backends are
    # equal when their options are: any two of these passes do the same, so they compare equal, and a module compiled
    # with options of its own shares the code of the first (else every layer compiles again: BACKEND_MATCH).
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


def _fold_residual_adds(graph: torch.fx.Graph) -> None:
    """``residual + product`` (a decoder layer's add after its down product; the o product's add falls in another
    compiled graph, after attention's graph break) as one operator, ``narrow_linear_add``, where the product is our
    kernel's and nothing else reads it: the sum happens in the product's kernel, and the step has one elementwise
    kernel fewer a layer. Only a plain add of two tensors of the same shape and dtype (no broadcast, no promotion,
    no ``alpha``) into a contiguous result, so the sum is the same float32 add, rounded once, that inductor's
    kernel did."""
    ops = torch.ops.hf_rolling_cache
    if not hasattr(ops, "narrow_linear_add"):  # registered once `_narrow_products` is imported
        return
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.add.Tensor or node.kwargs:
            continue
        if len(node.args) != 2 or not all(isinstance(arg, torch.fx.Node) for arg in node.args):
            continue
        for product, residual in (node.args[::-1], node.args):
            if (
                product.target is ops.narrow_linear.default and not product.kwargs and len(product.users) == 1
                and product is not residual and _same_tensor_kind(product, residual, node)
                and node.meta["val"].is_contiguous()
            ):
                with graph.inserting_before(node):
                    fused = graph.call_function(ops.narrow_linear_add.default, (*product.args, residual))
                fused.meta.update(node.meta)
                node.replace_all_uses_with(fused)
                graph.erase_node(node)
                graph.erase_node(product)
                break


def _same_tensor_kind(*nodes: torch.fx.Node) -> bool:
    values = [node.meta.get("val") for node in nodes]
    if not all(isinstance(value, torch.Tensor) for value in values):
        return False
    return all(value.shape == values[0].shape and value.dtype == values[0].dtype for value in values)


def _returned(node: torch.fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)
