"""Fast GLIDE (LongSpec) decoding: the draft layer on Triton kernels with a constant-size cache.

Same algorithm as :mod:`specdec.ref.glide` (read that file for the steps) and token-identical
greedy output; what changes is where the numbers live:

* :class:`FastGlide` -- the draft layer's weights fused once (``wqkv`` for self-attention,
  ``w13`` for the MLP);
* :class:`SlidingCache` -- the draft's own K/V in ONE buffer of ``2 * window + MAX_TREE_NODES``
  rows whatever the context length: row ``r`` holds position ``base + r``; when the prefix would
  overflow ``2 * window`` rows, the last ``window`` rows are moved to the front (one copy every
  ``window`` tokens) and ``base`` advances. Tree nodes of the current round sit right after the
  prefix rows and are simply overwritten next round;
* self-attention: :func:`specdec.fast.kernels.glide_self_attention` (sliding window over the
  prefix rows + the tree block with its ancestor mask), cross-attention:
  :func:`specdec.fast.kernels.glide_cross_attention` over the target's last-layer cache (split over
  its length; per-query bound = own position while catching up, the verified length ``L`` for
  tree nodes);
* verification, acceptance and compaction: :func:`specdec.fast.engine.run_speculative_fast`, the
  tree padded to ``1 + sum(tree_shape)`` nodes so one CUDA graph serves every round.

The package, by job:

* :mod:`.weights` -- :class:`FastGlide`, :func:`as_fast_glide`, :func:`load_glide`, :func:`shard_glide` (the
  rank's slice of the layer on a tensor-parallel target);
* :mod:`.cache` -- :class:`SlidingCache`, :class:`GlideBounds`;
* :mod:`.packing` -- the round's integers in one host-to-device copy (:func:`pack_ints`, ...);
* :mod:`.layer` -- :func:`glide_layer`, the draft layer on new tokens;
* :mod:`.drafter` -- :class:`FastGlideDrafter`: the round body, its CUDA graphs, fused and
  device-driven rounds;
* :mod:`.state` -- the drafter's state as typed records: a round's buffers, captured rounds and
  their keys, the :class:`~.state.GlideRuntime` a :class:`FastGlide` keeps across calls;
* :mod:`.decoders` -- :func:`tree_spec_generate`, :func:`spec_generate`.

Every name is importable from ``specdec.fast.glide`` itself.
"""

# Re-exports: every name importable from ``specdec.fast.glide`` when it was one module still is.
from specdec.fast.glide.weights import FastGlide, as_fast_glide, load_glide, shard_glide  # noqa: F401
from specdec.fast.glide.cache import GlideBounds, SlidingCache  # noqa: F401
from specdec.fast.glide.packing import catch_up_glide_bounds, catch_up_segments, pack_ints, unpack_ints  # noqa: F401
from specdec.fast.glide.layer import glide_layer  # noqa: F401
from specdec.fast.glide.state import CapturedRound, GlideRuntime, GraphKey, RoundBuffers, Verify  # noqa: F401
from specdec.fast.glide.drafter import FastGlideDrafter  # noqa: F401
from specdec.fast.glide.decoders import resolve_gamma, resolve_tree_shape, spec_generate, tree_spec_generate  # noqa: F401
from specdec.fast.engine import DeviceTree  # noqa: F401 -- kernels.beam's docstring names it here

__all__ = ["FastGlide", "SlidingCache", "as_fast_glide", "load_glide", "spec_generate", "tree_spec_generate"]
