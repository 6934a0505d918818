"""The fast path's one CUDA-graph capture mechanism.

:func:`capture` runs a graph-safe function a few times on a side stream (which compiles its Triton
kernels and lets the caching allocator settle outside the capture), then captures one more call
as a ``torch.cuda.CUDAGraph``. Every graph of the fast path is made by it:

* :class:`CapturedFn` -- a function of named device tensors with static copies of the inputs
  (the engine's greedy acceptance + KV compaction);
* the target's step graph per (cache, B, M) (:class:`specdec.fast.model._Graph`);
* the GLIDE round per catch-up length (:meth:`specdec.fast.glide.FastGlideDrafter._capture`);
* :class:`StaticRound` -- a drafter's fused greedy round per shape (the draft-model and MagicDec drafters),
  kept in a model's ``graphs`` and reused while the objects it reads are the same.

The function must be graph-safe: no host synchronisation, no allocation that depends on values,
fixed shapes. A graph reads every tensor it was captured with by address: the caller keeps them
alive (and in place) for as long as it replays the graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

__all__ = ["CapturedFn", "StaticRound", "capture"]

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


@dataclass
class StaticRound:
    """A function of static device tensors -- a drafter's fused round for one shape -- and, on CUDA, its graph.

    ``inputs``: the static tensors the body reads (the caller copies each round's values in with
    :meth:`run`); ``out``: what the body returned during the capture (rewritten by each replay); ``graph``:
    None where graphs are off (the body then runs eagerly on ``inputs``); ``owners``: the objects the graph
    reads by address (models, caches, RoPE tables) -- :meth:`get` reuses an entry only while every one of
    them is the same object."""

    body: Callable[..., tuple]
    inputs: tuple
    out: tuple
    graph: object
    owners: tuple

    @classmethod
    def get(cls, store: dict, key: tuple, owners: tuple, make_body: Callable[[], Callable[..., tuple]], inputs: tuple,
            device: torch.device, use_graphs: bool, restore: Callable[[], contextlib.AbstractContextManager]) -> "StaticRound":
        """The entry ``store[key]``, made if missing or stale: ``body = make_body()`` (which may build its
        constant tensors; the body must read nothing that ``key`` and ``owners`` do not pin), static copies
        of ``inputs`` on ``device`` (THIS round's values, from wherever they are: the warm-ups run ``body`` twice on them, so its idempotent writes
        are the round's own) and, with ``use_graphs``, the graph: two eager warm-ups, each inside
        ``restore()`` (which puts back what a round must not keep, e.g. the target cache's length and tree
        rows, so each starts from the round's state and stays inside the cache), then the capture. ``key[0]``
        should be the id of the cache whose reallocation must drop the entry
        (:meth:`specdec.fast.model.FastModel.ensure_cache`)."""
        entry = store.get(key)
        if entry is not None and (entry.graph is not None) == use_graphs and len(entry.owners) == len(owners) \
                and all(a is b for a, b in zip(entry.owners, owners)):
            return entry
        body = make_body()
        static = tuple(t.detach().to(device, copy=True) for t in inputs)
        graph, out = None, ()
        if use_graphs:
            for _ in range(2):   # eager warm-ups (they compile the kernels), each from the round's own state
                with restore():
                    body(*static)
            # the capture records and runs nothing, so the state it starts from is the round's
            graph, out = capture(lambda: body(*static), device=device, warmup=0)
        entry = store[key] = cls(body, static, out, graph, owners)
        return entry

    def run(self, *inputs: torch.Tensor) -> tuple:
        """Copy this round's ``inputs`` (host or device tensors) into the static ones, then replay the graph (or
        run the body eagerly)."""
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src, non_blocking=True)
        if self.graph is None:
            return self.body(*self.inputs)
        self.graph.replay()
        return self.out
