"""The fast path's one CUDA-graph capture mechanism.

:func:`capture` runs a graph-safe function a few times on a side stream (which compiles its Triton
kernels and lets the caching allocator settle outside the capture), then captures one more call
as a ``torch.cuda.CUDAGraph``. Every graph of the fast path is made by it:

* :class:`CapturedFn` -- a function of named device tensors with static copies of the inputs
  (the engine's greedy acceptance + KV compaction);
* the target's step graph per (cache, B, M) (:class:`specdec.fast.model._Graph`);
* the GLIDE round per catch-up length (:meth:`specdec.fast.glide.FastGlideDrafter._capture`).

The function must be graph-safe: no host synchronisation, no allocation that depends on values,
fixed shapes. A graph reads every tensor it was captured with by address: the caller keeps them
alive (and in place) for as long as it replays the graph.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

__all__ = ["CapturedFn", "capture"]

T = TypeVar("T")


def capture(body: Callable[[], T], *, device: torch.device | str | int | None = None, warmup: int = 2,
            pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Warm ``body`` up ``warmup`` times on a side stream, then capture one call as a CUDA graph.

    Args:
        body: the graph-safe work, called ``warmup + 1`` times (its side effects happen that often:
            a caller whose body changes state it must not keep restores it around this call).
        device: the CUDA device of the streams (default: the current one).
        warmup: eager calls before the capture (they compile the kernels outside it).
        pool: a memory pool handle (``torch.cuda.graph_pool_handle()`` or another graph's
            ``pool()``) to share between graphs that never run at the same time; None: a private one.

    Returns ``(graph, out)``: the graph, and what ``body`` returned during the capture (its static
    outputs: replaying the graph rewrites them in place).
    """
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(warmup):  # compiles kernels outside the capture
            body()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = body()
    return graph, out


class CapturedFn:
    """``fn(**inputs)`` captured once (:func:`capture`); calling it copies the new inputs into static
    copies of the inputs, replays the graph and returns the static outputs (valid until the next call)."""

    def __init__(self, fn: Callable[..., object], inputs: dict[str, torch.Tensor], warmup: int = 2):
        self.fn = fn
        self.inputs = {name: t.clone() for name, t in inputs.items()}
        dev = next(iter(self.inputs.values())).device
        self.graph, self.outputs = capture(lambda: fn(**self.inputs), device=dev, warmup=warmup)

    def __call__(self, **inputs: torch.Tensor):
        for name, t in inputs.items():
            self.inputs[name].copy_(t, non_blocking=True)
        self.graph.replay()
        return self.outputs
