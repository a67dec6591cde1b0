"""Prefill chunks by cuDNN's fused attention (NVIDIA's cudnn-frontend, where installed), in the compiled prefill.

Every prefill mask of the seed articles is, sequence by sequence, one band ("KV Caching in Mistral with
Transformers and xFormers": ``make_local_attention`` for a first chunk, ``make_local_attention_from_bottomright``
for a later one over the un-rotated cache): a sequence's ``q`` queries line up with the last ``q`` of its ``kv``
keys, and each sees itself and the ``window - 1`` keys before it (every earlier key, in a global layer). cuDNN's
SDPA takes exactly that: a diagonal aligned at each sequence's bottom right, a right bound of 0 and a left bound of
``window``, over ragged sequences packed back to back (an offset per sequence, no padding). On an H100 one layer's
attention over a 32k-token prompt in chunks of the window (32/8 heads, d=128, bf16) takes 3.7 ms this way, 6.1 ms by
FlexAttention and 7.5 ms by xFormers' flash operator (`benchmarks.prefill_attention`).

A graph is built per batch size, bucketed longest query and key runs, heads, head sizes, window, scale, dtype and
device: 0.04 s each, about 1 s for the first in a process. So it serves only the compiled prefill, which has asked
for a warm-up. Without cudnn-frontend, or where it fails for some inputs (warned once), the next kernel runs them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ._compiled_prefill import KernelSwitch, inside
from ._plan import StepPlan

logger = logging.getLogger(__name__)


class _CudnnPrefill(KernelSwitch):
    """Whether prefill chunks go to cuDNN: in the compiled prefill only, where cudnn-frontend imports, unless switched
    off or refused (`KernelSwitch`)."""

    def __init__(self) -> None:
        super().__init__("cuDNN")
        self._module = None  # the cudnn module; False: not installed, or it would not load
        self._handles: dict[int, object] = {}  # device index -> cuDNN handle
        self._graphs: dict[_Shape, _Graph] = {}

    def module(self):
        if self._module is None:
            # cudnn-frontend loads a CUDA runtime by name, and refuses to choose where two are on the library path
            # (PyTorch's, and another that an extension built for an older CUDA needs): take PyTorch's, whose
            # streams it runs on.
            if torch.version.cuda:
                runtime = f"libcudart.so.{torch.version.cuda.split('.')[0]}"
                os.environ.setdefault("CUDNN_FRONTEND_CUDART_LIB_NAME", runtime)
            try:
                import cudnn
            except ImportError:
                cudnn = False
            except Exception as error:  # noqa: BLE001 - installed, but its libraries would not load: as if absent
                logger.warning("cudnn-frontend is installed but does not load here (%s: %s); the compiled prefill "
                               "attends without it.", type(error).__name__, error)
                cudnn = False
            self._module = cudnn
        return self._module

    def handle(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._handles:
            with torch.cuda.device(index):
                self._handles[index] = self.module().create_handle()
        return self._handles[index]


_cudnn = _CudnnPrefill()


def applies(query: torch.Tensor, softcap: float | None, sinks: torch.Tensor | None) -> bool:
    """Inside the compiled prefill (`_compiled_prefill.inside`), where cudnn-frontend is installed."""
    return inside(query, softcap, sinks) and _cudnn.takes(query) and bool(_cudnn.module())


@dataclass(frozen=True)
class _Shape:
    """What a cuDNN graph is built for; the longest runs bucketed (`bucket`), the actual ones read at run time."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    max_queries: int
    max_keys: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    window: int | None
    scale: float


@dataclass
class _Graph:
    graph: object
    tensors: dict  # name -> the graph's tensor
    workspace: int  # bytes


def bucket(length: int) -> int:
    """A graph's longest run of queries or keys: the next power of two (at least 128), so a few graphs serve every
    prompt and chunk length (the ragged offsets and lengths say where each sequence really is)."""
    return max(128, 1 << (length - 1).bit_length())


def left_bound(window: int | None) -> int | None:
    """cuDNN's ``diagonal_band_left_bound`` for a window: a query sees its diagonal and ``bound - 1`` keys to the
    left of it (measured on an H100: ``window`` matches the xFormers masks, ``window - 1`` does not); None: every
    earlier key (a global layer)."""
    return window


def band_mask(q_seqlens, kv_seqlens, window: int | None) -> torch.Tensor:
    """The ``[T, S]`` mask cuDNN's band computes over packed sequences (True: attended), as its documentation
    defines it: per sequence, query ``i`` on the diagonal through key ``kv - q + i`` (bottom-right alignment), keys
    from ``left_bound`` to the left of it up to the diagonal (right bound 0). For tests against the plan's masks."""
    mask = torch.zeros(sum(q_seqlens), sum(kv_seqlens), dtype=torch.bool)
    bound = left_bound(window)
    row = column = 0
    for q, kv in zip(q_seqlens, kv_seqlens):
        query = torch.arange(q)[:, None]
        key = torch.arange(kv)[None, :]
        diagonal = kv - q + query
        visible = key <= diagonal
        if bound is not None:
            visible &= key > diagonal - bound
        mask[row:row + q, column:column + kv] = visible
        row, column = row + q, column + kv
    return mask


def ragged_offsets(plan: StepPlan, heads: int, kv_heads: int, head_dim: int, value_dim: int) -> torch.Tensor | None:
    """``[6, B + 1]`` int32: the element offset where each sequence starts in the packed queries, keys, values and
    output (``[T, H, D]`` back to back), then the query and key lengths (padded with a 0); None where an offset
    would not fit in int32."""
    q_seqlens = torch.tensor(plan.q_seqlens, dtype=torch.int64)
    kv_seqlens = torch.tensor(plan.kv_seqlens, dtype=torch.int64)
    q_starts = torch.nn.functional.pad(torch.cumsum(q_seqlens, 0), (1, 0))
    kv_starts = torch.nn.functional.pad(torch.cumsum(kv_seqlens, 0), (1, 0))
    rows = [q_starts * heads * head_dim, kv_starts * kv_heads * head_dim, kv_starts * kv_heads * value_dim,
            q_starts * heads * value_dim, torch.nn.functional.pad(q_seqlens, (0, 1)),
            torch.nn.functional.pad(kv_seqlens, (0, 1))]
    offsets = torch.stack(rows)
    return offsets.to(torch.int32) if int(offsets.max()) < 2**31 else None


def cudnn_packed(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan, scaling: float
) -> torch.Tensor | None:
    """Packed prefill attention ``[T, H_q, D_v]`` by cuDNN, or None where it cannot run here: keys and values
    other than the query's dtype, device, head size and a divisor of its heads (cuDNN would read their memory as
    the query's), or more elements than its int32 offsets count (this chunk only), or a failure (`KernelSwitch`)."""
    heads, head_dim = query.shape[1:]
    kv_heads, value_dim = values.shape[1:]
    if (
        not keys.dtype == values.dtype == query.dtype or not keys.device == values.device == query.device
        or keys.shape[1:] != (kv_heads, head_dim) or keys.shape[0] != values.shape[0] or heads % kv_heads
    ):
        return None
    key = ("cudnn_ragged", query.device, heads, kv_heads, head_dim, value_dim)
    if key not in plan._per_device:  # (once per plan: every layer of the kind shares it)
        offsets = ragged_offsets(plan, heads, kv_heads, head_dim, value_dim)
        plan._per_device[key] = None if offsets is None else offsets.to(query.device, non_blocking=True)
    offsets = plan._per_device[key]
    if offsets is None:
        return None
    shape = _Shape(query.device, query.dtype, plan.batch_size, bucket(max(plan.q_seqlens)),
                   bucket(max(plan.kv_seqlens)), heads, kv_heads, head_dim, value_dim, plan.window, float(scaling))
    return _cudnn.run(query, lambda: _attend(shape, query, keys, values, offsets.view(6, -1, 1, 1, 1)))


def _attend(shape: _Shape, query, keys, values, offsets) -> torch.Tensor:
    graph = _graph(shape)
    out = query.new_empty(query.shape[0], shape.heads, shape.value_dim)
    tensors = graph.tensors
    pack = {
        tensors["q"]: query.detach().contiguous(), tensors["k"]: keys.detach().contiguous(),
        tensors["v"]: values.detach().contiguous(), tensors["o"]: out,
        tensors["q_offsets"]: offsets[0], tensors["k_offsets"]: offsets[1], tensors["v_offsets"]: offsets[2],
        tensors["o_offsets"]: offsets[3], tensors["q_lengths"]: offsets[4, :-1],
        tensors["kv_lengths"]: offsets[5, :-1],
    }
    workspace = torch.empty(graph.workspace, dtype=torch.uint8, device=query.device)
    module, handle = _cudnn.module(), _cudnn.handle(query.device)
    module.set_stream(handle=handle, stream=torch.cuda.current_stream(query.device).cuda_stream)
    graph.graph.execute(pack, workspace, handle=handle)
    return out


def _graph(shape: _Shape) -> _Graph:
    if shape not in _cudnn._graphs:
        _cudnn._graphs[shape] = _build(shape)
    return _cudnn._graphs[shape]


def _build(shape: _Shape) -> _Graph:
    """The SDPA graph over ragged ``[T, H, D]`` tensors (a sequence's rows start at its offset), the band of the
    module docstring, fp32 softmax, no statistics (inference)."""
    cudnn = _cudnn.module()
    io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[shape.dtype]
    graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=_cudnn.handle(shape.device))
    tensors = {}

    def scalars(name: str, rows: int):
        tensors[name] = graph.tensor(name=name, dim=[rows, 1, 1, 1], stride=[1, 1, 1, 1],
                                     data_type=cudnn.data_type.INT32)
        return tensors[name]

    def packed(heads: int, dim: int, length: int) -> dict:  # [B, H, L, D] over rows of [T, H, D]
        return {"dim": [shape.batch, heads, length, dim], "stride": [length * heads * dim, dim, heads * dim, 1]}

    def ragged(name: str, heads: int, dim: int, length: int):
        tensors[name] = graph.tensor(name=name, **packed(heads, dim, length), data_type=io,
                                     ragged_offset=scalars(f"{name}_offsets", shape.batch + 1))
        return tensors[name]

    band = {"diagonal_alignment": cudnn.diagonal_alignment.BOTTOM_RIGHT, "diagonal_band_right_bound": 0}
    if left_bound(shape.window) is not None:
        band["diagonal_band_left_bound"] = left_bound(shape.window)
    out, _ = graph.sdpa(
        name="band", q=ragged("q", shape.heads, shape.head_dim, shape.max_queries),
        k=ragged("k", shape.kv_heads, shape.head_dim, shape.max_keys),
        v=ragged("v", shape.kv_heads, shape.value_dim, shape.max_keys), generate_stats=False,
        attn_scale=shape.scale, use_padding_mask=True, seq_len_q=scalars("q_lengths", shape.batch),
        seq_len_kv=scalars("kv_lengths", shape.batch), **band,
    )
    layout = packed(shape.heads, shape.value_dim, shape.max_queries)
    out.set_output(True).set_dim(layout["dim"]).set_stride(layout["stride"]).set_data_type(io)
    out.set_ragged_offset(scalars("o_offsets", shape.batch + 1))
    tensors["o"] = out
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Graph(graph, tensors, graph.get_workspace_size())
