"""Triton kernels of the fast path (docs/design.md §6 and §7).

* :func:`decode_attention` -- the target's decode-phase attention (a step or a verification): tree
  attention with position-aligned, row-invariant arithmetic (matches
  :func:`specdec.ref.attention.tree_attention`; bitwise the same row whatever M);
* :func:`row_linear` -- the decode phase's projections: a row-invariant GEMM with the RMSNorm /
  residual / SwiGLU folded in (matches ``F.linear`` and the eager ops);
* :func:`tree_attention` -- split-KV tree attention (the GLIDE draft's attentions run on its kernel;
  matches :func:`specdec.ref.attention.tree_attention`);
* :func:`glide_self_attention`, :func:`glide_cross_attention` -- the GLIDE draft's sliding-window
  self-attention and its cross-attention over the target cache, on the same kernel;
* :func:`beam_select` / :func:`beam_topk` -- one GLIDE beam level (matches
  :func:`specdec.shared.glide.beam_level`) written straight into the draft tree's buffers;
* :func:`row_argmax`, :func:`greedy_accept` -- greedy acceptance of a verified tree in two launches
  (matches :func:`specdec.shared.acceptance.greedy_best_node`);
* :func:`merge_attention` -- fold one more key block's partial attention into a running result by
  log-sum-exp, one launch (the blocked prefill's merge; matches :func:`merge_attention_ref` and
  :func:`specdec.ref.attention.merge_attention`);
* :func:`compact_kv` -- move the accepted tree rows of every layer's KV cache into place, one launch;
* :func:`gemv`, :func:`gemv_silu` -- one-row (decode) projections streaming the weight once, the
  second with the SwiGLU activation in its epilogue; either may fold in the RMSNorm before it, and
  :func:`gemv` the residual add after it (match :func:`gemv_ref` / :func:`gemv_silu_ref`);
  :func:`gemv_qkv_rope` -- the q|k|v projection with RoPE and the KV-cache write in its epilogue
  (matches :func:`gemv_qkv_rope_ref`), :func:`embed_gemv_qkv_rope` the same on token ids (the embedding lookup
  in the launch), :func:`gemv_q_rope` its query-only form (matches :func:`gemv_q_rope_ref`);
* :func:`round_pack` -- the integers of a device-driven GLIDE round from the cache length (matches
  ``FastGlideDrafter._pack``);
* :func:`log_softmax_f32` -- fp32 log-softmax of 16-bit logits in one launch (matches ``torch.log_softmax`` of the
  fp32 cast within fp32 rounding); :func:`logprobs_f32` picks it for 16-bit CUDA logits (the GLIDE beam's scores);
* :func:`keyed_noise` -- keyed sampling's Gumbel noise in one launch (matches
  :func:`specdec.shared.keyed.keyed_noise` bit for bit; not yet used by the decoders).

On CPU the kernels run only under the Triton interpreter: set ``TRITON_INTERPRET=1`` *before*
importing this package (:func:`interpreter_active` tells which mode was picked).
"""

from ._common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, interpreter_active
from .glide_attention import (
    glide_cross_attention,
    glide_cross_attention_ref,
    glide_self_attention,
    glide_self_attention_ref,
)
from .accept import greedy_accept, greedy_accept_ref, greedy_paths, row_argmax
from .beam import beam_select, beam_topk
from .gemv import embed_gemv_qkv_rope, gemv, gemv_q_rope, gemv_q_rope_ref, gemv_qkv_rope, gemv_qkv_rope_ref, gemv_ref, gemv_silu, gemv_silu_ref
from .kv_compact import compact_kv, compact_kv_ref
from .attention_merge import merge_attention, merge_attention_ref
from .round_pack import round_pack, round_pack_ref
from .keyed import keyed_noise
from .log_softmax import log_softmax_f32, logprobs_f32
from .tree_attention import tree_attention
from .decode_attention import ancestor_table, decode_attention
from .rowgemm import row_linear

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "interpreter_active",
    "tree_attention",
    "decode_attention",
    "ancestor_table",
    "row_linear",
    "glide_self_attention",
    "glide_self_attention_ref",
    "glide_cross_attention",
    "glide_cross_attention_ref",
    "merge_attention",
    "merge_attention_ref",
    "compact_kv",
    "compact_kv_ref",
    "beam_select",
    "beam_topk",
    "row_argmax",
    "greedy_accept",
    "greedy_accept_ref",
    "greedy_paths",
    "round_pack",
    "round_pack_ref",
    "keyed_noise",
    "log_softmax_f32",
    "logprobs_f32",
    "embed_gemv_qkv_rope",
    "gemv",
    "gemv_q_rope",
    "gemv_q_rope_ref",
    "gemv_qkv_rope",
    "gemv_qkv_rope_ref",
    "gemv_ref",
    "gemv_silu",
    "gemv_silu_ref",
]

from .fused import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_ref,
    embed_rms_norm,
    embed_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    rope_qkv_write,
    rope_qkv_write_ref,
    rope_q,
    rope_q_ref,
    silu_mul,
    silu_mul_ref,
)

__all__ += [
    "rms_norm",
    "rms_norm_ref",
    "add_rms_norm",
    "add_rms_norm_ref",
    "embed_rms_norm",
    "embed_rms_norm_ref",
    "rope_qkv_write",
    "rope_qkv_write_ref",
    "rope_q",
    "rope_q_ref",
    "silu_mul",
    "silu_mul_ref",
]

if interpreter_active():   # the CPU tests check row invariance: make the interpreter's dot row-invariant too
    from ._common import make_interpreter_dot_row_invariant

    make_interpreter_dot_row_invariant()
