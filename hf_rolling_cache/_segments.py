"""Capturing one decode step of a model Accelerate split over GPUs: one CUDA graph per device.

PyTorch captures a graph on one device, and a copy to another device inside a capture would be ordered by events
outside it. So the step is cut where it changes device: every module Accelerate placed on a GPU of its own
(``device_map``) ends the segment in progress when its inputs arrive from another device; those inputs (hidden
states, rotary tables, positions) and the step's device counters are staged on its device as static copies, and a
capture begins there. A replay (`_decode_graph.DecodeGraph.run`) copies each segment's hand-off, then replays it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

_UNSET = object()


@dataclass(frozen=True)
class Placement:
    """Where Accelerate runs a model's parts: the submodules it placed on a CUDA device of their own
    (``device_map``), with that device, and whether any hook offloads weights to the CPU or disk."""

    modules: tuple[tuple[torch.nn.Module, torch.device], ...] = ()
    offloaded: bool = False

    @property
    def split(self) -> bool:
        """Parts on more than one GPU: a decode step is captured in segments, one per device."""
        return len({device for _, device in self.modules}) > 1


def placement_of(model: torch.nn.Module) -> Placement:
    placed, offloaded = [], False
    for module in model.modules():
        hooks = getattr(module, "_hf_hook", None)
        hooks = getattr(hooks, "hooks", (hooks,))  # Accelerate's SequentialHook holds several
        for hook in hooks:
            if hook is None:
                continue
            offloaded = offloaded or bool(getattr(hook, "offload", False))
            device = getattr(hook, "execution_device", None)
            if device is not None and module is not model:
                device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
                if device.type != "cuda":
                    offloaded = True  # a part that runs off the GPU: nothing to capture there
                placed.append((module, device))
    return Placement(tuple(placed), offloaded)


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up and capture stream per device for every graph: cuBLAS keeps a workspace per stream it has
    run on, so a fresh stream per capture would leave one more workspace allocated each time."""
    return torch.cuda.Stream(device)


@dataclass(eq=False)
class Segment:
    """The part of a decode step that runs on one device, captured as one graph, and the tensors handed to it
    from the segment before: ``(source there, static copy here)``, copied before each replay."""

    device: torch.device
    graph: torch.cuda.CUDAGraph
    handoff: list[tuple[torch.Tensor, torch.Tensor]]


class SegmentedCapture:
    """Captures a decode step as one CUDA graph per device, for a model Accelerate split over devices.

    PyTorch captures a graph on one device, and a captured copy to another device would be ordered by events
    outside the capture. So every module Accelerate placed on another device is a switch: the capture on the
    current device ends there, the module's tensor inputs (hidden states, rotary tables, positions) and the
    step's device counters are staged on its device as static copies, and a capture there begins. A replay runs
    the segments in order and copies each hand-off (a few KB) between them; PyTorch orders a cross-device copy
    after the work on both devices' current streams, so no segment reads a tensor before it is written.
    """

    def __init__(self, ledger, device: torch.device, placed, capture: bool = True) -> None:
        self.ledger = ledger
        self.placed = placed  # (module, device) for each module Accelerate placed on a device
        self.capture = capture  # False: a warm-up, which stages the same inputs (compiled code sees what it will)
        self.segments: list[Segment] = []
        self._capturing: contextlib.ExitStack | None = None
        self._copies: dict[tuple[torch.device, int], torch.Tensor] = {}  # (device, id of source): staged copy
        self._columns = ledger.counters.columns  # changes when the step commits
        self._begin(device, [])

    @property
    def device(self) -> torch.device:
        return self.segments[-1].device

    def _begin(self, device: torch.device, handoff) -> None:
        graph = torch.cuda.CUDAGraph() if self.capture else None
        self._capturing = contextlib.ExitStack()
        self._capturing.enter_context(torch.cuda.device(device))
        if graph is not None:
            self._capturing.enter_context(torch.cuda.graph(graph, stream=side_stream(device)))
        self.segments.append(Segment(device, graph, handoff))

    def finish(self) -> None:
        """End the capture in progress."""
        capturing, self._capturing = self._capturing, None
        if capturing is not None:
            capturing.close()

    def abandon(self) -> None:
        """End the capture after the step raised: the capture's own error (it is invalid now) would hide the
        step's, which says what went wrong."""
        try:
            self.finish()
        except RuntimeError:
            pass

    def _switch(self, device: torch.device, args, kwargs):
        """End the segment in progress and begin one on ``device``, with the inputs from elsewhere staged there."""
        self.finish()
        step_begun = self.ledger.decode_step_open() or self.ledger.counters.columns != self._columns
        if len(self.segments) == 1 and not step_begun:
            # the step would open on a later device, reading the attention mask from the first: run it eagerly
            raise NotCapturable(f"the first decoder layer is not on {self.device}, where the inputs are")
        handoff = self.ledger.stage_on(device)
        values, _ = tree_flatten((args, kwargs))
        for value in values:
            if _foreign(value, device):
                if (device, id(value)) not in self._copies:
                    self._copies[device, id(value)] = value.to(device)
                handoff.append((value, self._copies[device, id(value)]))
        self._begin(device, handoff)
        return self._staged(args, kwargs)

    def _staged(self, args, kwargs):
        """The module's inputs with each tensor from another device replaced by its copy on this segment's
        device. The model hands the same tensors (rotary tables, positions) to every layer, so later layers get
        the copies staged earlier in the step; a tensor not staged yet (Gemma 3's second rotary table, first read
        by its first global layer) ends the segment: a new one begins on the same device with it handed over."""
        device = self.device
        values, spec = tree_flatten((args, kwargs))
        if any(_foreign(value, device) and (device, id(value)) not in self._copies for value in values):
            return self._switch(device, args, kwargs)
        staged = [self._copies[device, id(value)] if _foreign(value, device) else value for value in values]
        return tree_unflatten(staged, spec)

    @contextlib.contextmanager
    def switching(self):
        """Inside the block, each placed module switches the capture to its device when its inputs arrive."""
        previous = [vars(module).get("forward", _UNSET) for module, _ in self.placed]
        for module, device in self.placed:
            module.forward = self._on_device(module.forward, device)
        try:
            yield
        finally:
            for (module, _), held in zip(self.placed, previous):
                if held is _UNSET:
                    del module.forward
                else:
                    module.forward = held

    def _on_device(self, forward, device: torch.device):
        def forward_on_device(*args, **kwargs):
            if device != self.device:
                args, kwargs = self._switch(device, args, kwargs)
            else:
                args, kwargs = self._staged(args, kwargs)
            return forward(*args, **kwargs)

        return forward_on_device


def _foreign(value, device: torch.device) -> bool:
    return isinstance(value, torch.Tensor) and value.is_cuda and value.device != device


class NotCapturable(Exception):
    """This model's decode step cannot be captured in segments (it runs eagerly instead)."""
