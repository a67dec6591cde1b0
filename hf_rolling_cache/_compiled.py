"""The compiled decoder layers of `use_cuda_graphs(model, compile=True)`: each layer's forward through
``torch.compile``, its q/k/v and gate/up products fused (`_fused`), and every plain product of the step (the
head's too) multiplied by our kernel for a few rows where it applies (`_narrow_products`; a SiLU MLP's activation
and a layer's residual add inside it), installed only while a decode step is warmed up and captured
(`CompiledLayers.swapped_in`), so every other call runs the user's modules untouched."""

from __future__ import annotations

import contextlib
import types

import torch

from . import _ring_decode
from ._compiled_prefill import distinct_sizes, prefill_kernel
from ._fused import SameProducts, fuse_groups, gated_swap, narrow_forward, narrow_launch, wrapped
from ._kept_rows import last_layer_swaps
from ._tp_products import agreed, local, shard_of
from ._tp_products import swapped_in as sharded_products
from .cache import RollingSlidingWindowCache


class CompiledLayers:
    """The model's decoder layers and final norm, compiled for the captured decode step only.

    ``torch.compile`` wraps each module's bound ``forward``; `swapped_in` installs those as instance attributes
    for the warm-up and the capture, then puts back what was there, so every other call runs the user's modules
    untouched.
    """

    def __init__(self, model: torch.nn.Module, backend: str = "inductor", prefill: bool = False) -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
            raise ValueError(
                f"use_cuda_graphs(compile=True) compiles the decoder layers, but {type(model).__name__} has no "
                "model.get_decoder().layers: use compile=False for this model."
            )
        modules = list(layers)
        norm = getattr(decoder, "norm", None)
        if isinstance(norm, torch.nn.Module):
            modules.append(norm)
        self.modules = modules
        self.layers = list(layers)
        # Every plain product of the step: the layers' and the head's (eager in the captured step, after the norm).
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        linears = [sub for m in modules for sub in m.modules() if type(sub) is torch.nn.Linear]
        if type(head) is torch.nn.Linear:
            linears.append(head)
        self._linears = list({id(linear): linear for linear in linears}.values())  # a module shared by layers: once
        self.groups = fuse_groups(model, list(layers))  # q/k/v and gate/up weights as rows of one buffer each
        self._backend = backend
        # one dict for every module's torch.compile: dynamo compares the backends at each lookup of the shared code
        self._options = _inductor_options() if backend == "inductor" else None
        self._compiled = [torch.compile(m.forward, backend=backend, dynamic=False, options=self._options)
                          for m in modules]
        self.prefill = prefill  # prefill forwards run compiled too (`use_cuda_graphs(compile_prefill=True)`)
        self._prefill = None  # compiled for prefill on first use (`prefill_swapped_in`)
        self.sharded = any(shard_of(linear) is not None for linear in self._linears)  # tensor parallel
        self._writers: dict = {}  # a layer kind's decode writer -> its compiled copy (plain and fp8 rings differ)
        # Transformers' attention hands its int ``layer_idx`` to the cache's update (a graph break), and dynamo
        # specializes an int attribute of a module: one recompile per layer, most of a 7B model's warm-up. As a
        # 0-d tensor it is a graph input instead, so every layer of a kind shares one compiled code (the cache's
        # update turns it back into an int, eagerly).
        self._layer_indices = [
            (sub, torch.tensor(sub.layer_idx))
            for m in modules for sub in m.modules() if type(getattr(sub, "layer_idx", None)) is int
        ]

    @contextlib.contextmanager
    def swapped_in(self, cache: RollingSlidingWindowCache | None = None):
        """Compiled forwards on the modules (and a compiled ring write on ``cache``'s layers) inside the block."""
        rings = list(cache.layers) if cache is not None else []
        swaps = self._layer_swaps(self._compiled)
        swaps += [(ring, "decode_writer", self._compiled_writer(ring)) for ring in rings]
        with self._compile_settings(), contextlib.ExitStack() as fused:
            for group in list(self.groups):
                if group.intact():
                    fused.enter_context(group.swapped_in())
                else:  # a parameter replaced since (model.to, a new Parameter): that group runs unfused from now on
                    group.separate()
                    self.groups.remove(group)
            swaps += [swap for group in self.groups if (swap := gated_swap(group)) is not None]
            swaps += self._narrow_swaps()
            fused.enter_context(sharded_products(self._sharded_products()))
            with _installed(swaps):
                yield

    @contextlib.contextmanager
    def prefill_swapped_in(self, last_row_only: bool = False, last_layer: torch.nn.Module | None = None):
        """For a prefill forward (`graphs.use_cuda_graphs`): the layers compiled for any number of tokens (dynamic
        shapes: one compilation per layer kind serves every prompt and chunk length), their products cuBLAS's, and
        the attention cuDNN's or FlexAttention's (`_compiled_prefill`). With ``last_row_only`` (`_kept_rows.last_row_only`:
        the caller reads only the last position's logits), the last decoder layer computes its products after the
        keys and values for that row only (`_kept_rows`; compiled as a code of its own): ``last_layer``, the top one
        this forward runs (a prefill chunk that stops early, `_reach`), by default the model's last."""
        if self._prefill is None:
            self._prefill = [
                _with_contiguous_inputs(torch.compile(m.forward, backend=self._backend, options=self._options))
                for m in self.modules
            ]
        swaps = self._layer_swaps(self._prefill)
        if last_row_only:
            swaps += last_layer_swaps(self.layers[-1] if last_layer is None else last_layer)
        with self._compile_settings(), distinct_sizes(), _installed(swaps), prefill_kernel():
            yield

    def _layer_swaps(self, forwards: list) -> list[tuple]:
        """``forwards`` on the modules, and each attention's ``layer_idx`` as a tensor (see ``__init__``)."""
        swaps = [(m, "forward", forward) for m, forward in zip(self.modules, forwards)]
        return swaps + [(sub, "layer_idx", as_tensor) for sub, as_tensor in self._layer_indices]

    def _compile_settings(self):
        """Dynamo's settings while our compiled forwards run. One compiled code serves every layer of a kind (sliding
        or global), specialized again per batch size: it may hold many entries instead of falling back to eager after
        the default 8. And a compilation that fails (an inductor error on some model) runs that code eagerly, with
        PyTorch's warning and its traceback, instead of failing the user's generation: the layers compute the same.
        Unless dynamo was asked to raise at any recompilation (``error_on_recompile``, as tests do), which
        suppressing errors would swallow too."""
        limit = 8 * len(self.modules)
        config = torch._dynamo.config
        fall_back = config.suppress_errors or (EAGER_ON_COMPILE_ERROR and not config.error_on_recompile)
        return config.patch(recompile_limit=limit, accumulated_recompile_limit=max(256, 4 * limit),
                            suppress_errors=fall_back)  # (a user's own suppress_errors stays)

    def _narrow_swaps(self) -> list[tuple]:
        """A forward multiplying by our kernel (`_narrow_products`) for each plain product outside the fused groups
        whose weight the kernel takes, and that nobody else's code wraps (`_fused.wrapped`)."""
        fused = {id(part) for group in self.groups for part in group.parts}
        swaps = []
        for linear in self._linears:
            if id(linear) in fused or wrapped(linear):
                continue
            launch = narrow_launch(linear.weight, linear.bias)
            if launch is not None:
                swaps.append((linear, "narrow_launch", launch))
                swaps.append((linear, "forward", types.MethodType(narrow_forward, linear)))
        return swaps

    def _sharded_products(self) -> list[tuple]:
        """Each tensor-parallel product outside the fused groups (`_tp_products.shard_of`) whose local weight our
        kernel takes (a row-parallel one: on every rank, `_tp_products.agreed`), with its launch."""
        fused = {id(part) for group in self.groups for part in group.parts}
        shards = []
        for linear in self._linears:
            sharded = shard_of(linear) if id(linear) not in fused else None
            if sharded is not None:
                shards.append((linear, sharded, narrow_launch(local(linear.weight), local(linear.bias))))
        return agreed(shards)

    def release(self) -> None:
        """Give the fused groups' parameters their own storage again (`release_cuda_graphs`)."""
        for group in self.groups:
            group.separate()
        self.groups = []

    def _compiled_writer(self, layer):
        """The compiled copy of ``layer``'s kind of decode write (one per kind, shared by its layers)."""
        writer = type(layer).decode_writer
        if writer not in self._writers:
            # Inductor drops a float16 round trip inside a fused kernel unless told to keep it: the 8-bit ring's
            # codes would then be divided by the unrounded scale, not by the float16 one stored beside them.
            options = {"emulate_precision_casts": True} if self._backend == "inductor" else None
            self._writers[writer] = torch.compile(writer, backend=self._backend, dynamic=False, options=options)
        return self._writers[writer]


_UNSET = object()


def _with_contiguous_inputs(compiled):
    """``compiled`` called with its tensor arguments in the standard strides of their shapes, their token dimension
    (that of ``hidden_states``: the second of a batched tensor, the first of ``cache_position``) marked dynamic,
    so one compilation serves every prompt and chunk length while head and hidden sizes stay static. Standard
    strides: generate's chunked prefill hands each layer a slice of the prompt's ``position_ids``, ``[1, chunk]``
    with a row stride of the prompt's length (contiguous as far as ``is_contiguous`` cares, so ``.contiguous()``
    keeps it), and compiled code may guard on strides (with PyTorch 2.11 on our H100s, the layers compiled again
    on ``position_ids.stride()[0] == position_ids.size()[1]``)."""

    def standard(tensor: torch.Tensor) -> torch.Tensor:
        strides, step = [], 1
        for size in reversed(tensor.shape):
            strides.append(step)
            step *= size
        if tensor.stride() == tuple(reversed(strides)):
            return tensor
        return tensor.clone(memory_format=torch.contiguous_format)

    def prepared(value, tokens: int):
        if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            return tuple(prepared(v, tokens) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        value = standard(value)
        dim = 1 if value.dim() >= 2 else 0
        if value.dim() >= 1 and value.shape[dim] == tokens and tokens > 1:
            torch._dynamo.maybe_mark_dynamic(value, dim)
        return value

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        tokens = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else 0
        return compiled(*(prepared(a, tokens) for a in args),
                        **{name: prepared(value, tokens) for name, value in kwargs.items()})

    return forward


@contextlib.contextmanager
def _installed(swaps: list[tuple]):
    """Each ``(obj, name, replacement)`` set as an instance attribute inside the block, then whatever the instance
    held before put back (an Accelerate hook may have set its own forward), in reverse, even after a failure:
    nothing of ours stays on a module."""
    previous = [vars(obj).get(name, _UNSET) for obj, name, _ in swaps]
    try:
        for obj, name, replacement in swaps:
            setattr(obj, name, replacement)
        yield
    finally:
        for (obj, name, _), held in reversed(list(zip(swaps, previous))):
            if held is _UNSET:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, held)

# Whether code that fails to compile runs eagerly (`CompiledLayers._compile_settings`). The tests switch it off, so a
# compilation that fails there fails the test instead of passing eagerly.
EAGER_ON_COMPILE_ERROR = True

# Whether inductor's kernels are programmatic dependent launches where ours are (`_inductor_options`). Off: see there.
INDUCTOR_DEPENDENT_LAUNCH = False


def _inductor_options() -> dict:
    """Our post-grad pass (one product per fused group, residual adds in the products: `SameProducts`), and whether
    inductor's kernels are programmatic dependent launches (its ``triton.enable_pdl``, which it applies on Hopper and
    later only; set either way, so an environment variable does not decide it for the captured step).

    Off by default, though it gave 0.6-1% of decode speed on an H100: inductor makes a kernel wait only before it
    touches what the kernel just before it wrote, which is safe only if that kernel itself waited for its own
    predecessor before it let the next one start. A kernel of inductor's that loads nothing (a fill, such as the
    zeros a scatter starts from) neither waits nor lets the next start early, yet may finish before the kernel
    before it: the kernel after it could then read that kernel's output unfinished. Our own kernels wait at their
    start, so they stay dependent launches (`_ring_decode.dependent_launch`)."""
    options = {"post_grad_custom_pre_pass": SameProducts()}
    if hasattr(torch._inductor.config.triton, "enable_pdl"):  # (PyTorch 2.9 and later)
        options["triton.enable_pdl"] = INDUCTOR_DEPENDENT_LAUNCH and _ring_decode._CONFIG["dependent_launch"]
    return options
